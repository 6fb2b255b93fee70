"""The run report: plots rendered headless, report.md / report.html rebuilt from the run folder alone,
the plots showing exactly what the run recorded (AdaLoRA ranks and budget, confusions, per-class F1),
and report.html rendered by a real browser with every image loaded."""

import base64
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides

from peftlab import cli, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path("/usr/bin/chromium")
COMMON = ["validation.png", "loss.png", "per_class_f1.png", "confused_pairs.png", "confusion.png",
          "reliability.png"]  # every run now records calibration; no out-of-scope texts here: no rejection plots
EXPECTED_PLOTS = {"lora": COMMON, "adalora": [*COMMON, "adalora_ranks.png", "adalora_budget.png"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, small_data):
    out = tmp_path_factory.mktemp("report-runs")
    assert cli.main(["train", *tiny_overrides(tiny_model, small_data, out, "lora")]) == 0
    # deltaT=1: ranks move between modules on this short schedule (as in test_methods)
    assert cli.main(["train", *tiny_overrides(tiny_model, small_data, out, "adalora", **{"adapter.deltaT": 1})]) == 0
    return {"lora": out / "lora", "adalora": out / "adalora"}


def load(run: Path, name: str):
    return json.loads((run / name).read_text())


def figures(run: Path) -> dict:
    """The report's figures, built by the same code path write_report uses, from the run's files."""
    names = list(load(run, "labels.json")["id2label"].values())
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return report.build(load(run, "summary.json"), history, load(run, "test_metrics.json"), names)[1]


def pixels(data_or_path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(data_or_path if isinstance(data_or_path, Path) else __import__("io").BytesIO(data_or_path))


class Sources(HTMLParser):
    """Every tag with a src/href, and every <img> src."""

    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [(tag, k, v or "") for k, v in attrs if k in ("src", "href", "srcset", "data")]


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_train_writes_valid_pngs_linked_from_report_md(runs, method):
    run = runs[method]
    md = (run / "report.md").read_text()
    assert "| Epoch | Step | Training Loss | Validation Loss | Accuracy | F1 |" in md  # the write-ups' table stays
    linked = re.findall(r"!\[[^\]]*\]\(plots/([^)]+)\)", md)
    assert linked == EXPECTED_PLOTS[method]
    for name in linked:
        data = (run / "plots" / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        img = pixels(run / "plots" / name)
        assert img.ndim == 3 and min(img.shape[:2]) > 100 and img.std() > 0.01, (name, img.shape)
    assert not list(run.glob("**/.*tmp"))


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_report_html_is_self_contained(runs, method):
    run = runs[method]
    page = (run / "report.html").read_text()
    parser = Sources()
    parser.feed(page)
    imgs = [v for tag, k, v in parser.refs if tag == "img"]
    assert [(t, k) for t, k, _ in parser.refs] == [("img", "src")] * len(EXPECTED_PLOTS[method])
    assert all(v.startswith("data:image/png;base64,") for v in imgs)
    # each inlined image is the PNG written next to it, in the report's order
    for v, name in zip(imgs, EXPECTED_PLOTS[method], strict=True):
        assert base64.b64decode(v.split(",", 1)[1]) == (run / "plots" / name).read_bytes()
    assert "<link" not in page and "http://" not in page and "https://" not in page
    assert "<table>" in page and "<th class=\"r\">Training Loss</th>" in page


def test_report_command_regenerates_from_the_folder_alone_without_torch(runs, tmp_path):
    run = tmp_path / "lora"
    shutil.copytree(runs["lora"], run)
    md = (run / "report.md").read_text()
    shutil.rmtree(run / "plots")
    (run / "report.md").unlink()
    (run / "report.html").unlink()
    code = ("import sys; from peftlab import cli; rc = cli.main(['report', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'report imported torch'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (run / "report.md").read_text() == md
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(EXPECTED_PLOTS["lora"])
    assert str(run / "report.html") in r.stdout and (run / "report.html").stat().st_size > 10_000


def test_report_module_imports_without_torch_or_matplotlib():
    code = "import sys, peftlab.report; assert not {'torch', 'matplotlib'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_report_on_a_missing_or_unfinished_run_is_a_one_line_error(runs, tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: run folder '{tmp_path / 'nope'}' not found"
    run = tmp_path / "unfinished"
    shutil.copytree(runs["lora"], run)
    (run / "summary.json").unlink()
    assert cli.main(["report", str(run)]) == 2
    assert capsys.readouterr().err.strip() == f"error: run '{run}' did not finish (no summary.json); train it again"


def test_adalora_heatmap_shows_the_recorded_final_ranks(runs):
    run = runs["adalora"]
    final = load(run, "summary.json")["adalora"]["final_ranks"]
    # Independently of report.rank_grid: bert.encoder.layer.<L>.attention.self.<module>
    expected = np.zeros((2, 2))
    for key, rank in final.items():
        layer = int(re.search(r"\.layer\.(\d+)\.", key).group(1))
        expected[layer, ["query", "value"].index(key.rsplit(".", 1)[1])] = rank
    assert len(final) == 4 and len(set(final.values())) > 1  # ranks moved: the heatmap is not uniform

    fig = figures(run)["adalora_ranks.png"]
    ax = fig.axes[0]
    shown = ax.images[0].get_array()
    assert not np.ma.is_masked(shown) and np.array_equal(np.asarray(shown), expected)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["query", "value"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1"]
    assert sorted(float(t.get_text()) for t in ax.texts) == sorted(expected.ravel())
    # and the PNG in the run folder is this figure
    assert np.array_equal(pixels(report.png(fig)), pixels(run / "plots" / "adalora_ranks.png"))


def test_rank_budget_goes_from_init_r_to_target_r_times_modules(runs):
    s = load(runs["adalora"], "summary.json")
    a = s["adalora"]
    history = a["rank_history"]
    assert history[0] == [0, 12 * 4] and history[-1] == [s["optimizer_steps"], 8 * 4] == [28, a["budget"]]
    assert len(history) > 2 and [h[0] for h in history] == sorted({h[0] for h in history})
    final_allocation = a["total_step"] - a["tfinal"]
    assert all(b == a["budget"] for step, b in history if step > final_allocation)
    line = next(ln for ln in figures(runs["adalora"])["adalora_budget.png"].axes[0].lines
                if ln.get_label() == "sum of ranks")
    assert list(line.get_xdata()) == [h[0] for h in history]
    assert list(line.get_ydata()) == [h[1] for h in history]


def test_confused_pairs_and_per_class_plot_match_the_recorded_metrics(runs):
    run = runs["lora"]
    s, test = load(run, "summary.json"), load(run, "test_metrics.json")
    names = list(load(run, "labels.json")["id2label"].values())
    cm = np.array(test["confusion"])
    assert cm.shape == (6, 6) and cm.sum() == 60 and cm.trace() == round(test["accuracy"] * 60)
    assert cm.sum(axis=1).tolist() == [s["label_counts"]["test"][n] for n in names]
    assert sum(s["label_counts"]["train"].values()) == s["splits"]["train"]

    figs = figures(run)
    ax = figs["confused_pairs.png"].axes[0]
    counts = [p.get_width() for p in ax.patches]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    off = sorted((cm[t, p] for t in range(6) for p in range(6) if t != p and cm[t, p]), reverse=True)
    assert counts == off[:15] and len(labels) == len(counts)
    for label, n in zip(labels, counts, strict=True):
        true, predicted = label.split(" → ")
        assert cm[names.index(true), names.index(predicted)] == n
    assert np.array_equal(np.asarray(figs["confusion.png"].axes[0].images[0].get_array()), cm)

    points = figs["per_class_f1.png"].axes[0].collections[0].get_offsets()
    expected = [[s["label_counts"]["train"][n], 100 * test["per_class"][n]["f1-score"]] for n in names]
    assert np.allclose(points, expected)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium not installed (apt-get install -y chromium)")
def test_report_html_renders_in_headless_chromium_with_every_image_loaded(runs, tmp_path):
    page = (runs["adalora"] / "report.html").resolve().as_uri()
    flags = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2000", page],
                   check=True, capture_output=True, timeout=120)
    img = pixels(shot)
    assert img.shape[:2] == (2000, 1200), img.shape
    not_white = (img[..., :3] < 0.9).any(axis=-1).mean()
    assert shot.stat().st_size > 50_000 and not_white > 0.01, (shot.stat().st_size, not_white)

    # report.html's inline script marks <body> with "loaded/total" images once the page has loaded.
    dom = subprocess.run([*flags, "--dump-dom", "--virtual-time-budget=5000", page],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    n = len(EXPECTED_PLOTS["adalora"])
    assert f'data-images-loaded="{n}/{n}"' in dom, dom[:300]


# ------------------------------------------------------------- calibration and out-of-scope rejection
# From synthetic summaries (the sections confidence.fit writes): no training needed.

SCORERS = ("msp", "energy", "mahalanobis", "knn")


def reliability(shift: float) -> dict:
    conf = [round((i + 0.5) / 15, 4) for i in range(15)]
    count = [0] * 5 + [3, 0, 4, 6, 8, 10, 12, 20, 30, 40]  # the low-confidence bins are empty
    return {"confidence": conf, "accuracy": [round(min(1.0, max(0.0, c - shift)), 4) for c in conf], "count": count}


def synthetic_summary(**sections) -> dict:
    s = {"method": "lora", "dataset": "banking77", "backbone": "tiny", "parameters": "1,000 of 100,000 (1.00%)",
         "splits": {"train": 240, "validation": 30, "test": 60}, "optimizer_steps": 28, "best_epoch": 2,
         "best_step": 28, "test_accuracy": 0.9, "test_f1": 0.89, "train_seconds": 60.0,
         "train_samples_per_second": 100.0, "peak_memory_mb": 500.0}
    return {**s, **sections}


CALIBRATION = {"temperature": 1.42, "fitted_on": "validation (1000 texts)", "ece_before": 0.05, "ece_after": 0.012,
               "brier_before": 0.1834, "brier_after": 0.1612, "reliability_before": reliability(0.1),
               "reliability_after": reliability(0.01)}


def rejection_section(with_oos: bool = True, method: str = "mahalanobis") -> dict:
    rng = np.random.default_rng(0)
    scorers, hists, curves = {}, {}, {}
    for i, name in enumerate(SCORERS):
        row = {"threshold": -12.5 if name == "mahalanobis" else 0.5 + i / 10, "in_scope_kept": 0.95 - i / 100,
               "in_scope_accuracy": 0.88 - i / 100, "selected_by": "best out-of-scope F1 on validation (0.812)"}
        if with_oos:
            row.update(oos_precision=0.7, oos_recall=0.6 + i / 100, oos_f1=0.65, auroc=0.9 - i / 100, fpr_at_95=0.4,
                       overall_accuracy=0.85)
            edges = np.linspace(-1, 1, 31)
            hists[name] = {"edges": edges.tolist(), "in": np.histogram(rng.normal(0.5, 0.2, 200), edges)[0].tolist(),
                           "out": np.histogram(rng.normal(-0.3, 0.3, 50), edges)[0].tolist()}
        scorers[name] = row
        coverage = np.linspace(0.02, 1, 50)
        curves[name] = {"coverage": coverage.round(4).tolist(), "risk": (0.12 * coverage ** (1 + i)).round(5).tolist()}
    return {"method": method, "label": "out_of_scope", "threshold": scorers[method]["threshold"] if method != "none"
            else None, "test_in_scope": 200, "test_out_of_scope": 50 if with_oos else 0, "validation_out_of_scope": 40,
            "scorers": scorers, "histograms": hists, "risk_coverage": curves}


def synthetic_run(folder: Path, summary: dict) -> Path:
    folder.mkdir()
    (folder / "labels.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b"}}))
    written = report.write_report(folder, summary, [])
    assert folder / "report.md" in written
    return folder


def test_report_has_calibration_and_rejection_sections_when_recorded(tmp_path):
    run = synthetic_run(tmp_path / "run", synthetic_summary(calibration=CALIBRATION, rejection=rejection_section()))
    md = (run / "report.md").read_text()
    assert "## Calibration" in md and "## Out-of-scope rejection" in md
    assert "| Metric | Before scaling | After scaling |" in md
    assert "| Temperature | 1 | 1.42 |" in md
    assert "| ECE (15 bins) | 5.00% | 1.20% |" in md
    assert "| Brier score | 0.1834 | 0.1612 |" in md
    assert ("The `mahalanobis` score decides: a text scoring below -12.5 is labelled `out_of_scope`. How the "
            "threshold was chosen: best out-of-scope F1 on validation (0.812).") in md
    assert ("| Scorer | Threshold | In-scope kept | In-scope accuracy | OOS precision | OOS recall | OOS F1 | AUROC "
            "| FPR@95 | Overall accuracy |") in md
    assert "| `msp` | 0.5 | 95.00% | 88.00% | 70.00% | 60.00% | 65.00% | 90.00% | 40.00% | 85.00% |" in md
    assert "| **`mahalanobis`** (deciding) | -12.5 | 93.00% | 86.00% | 70.00% | 62.00% | 65.00% | 88.00% |" in md
    assert sum(line.startswith("| `") or line.startswith("| **`") for line in md.splitlines()) == 4

    linked = re.findall(r"!\[[^\]]*\]\(plots/([^)]+)\)", md)
    assert linked == ["reliability.png", "ood_histograms.png", "risk_coverage.png"]
    for name in linked:
        assert (run / "plots" / name).read_bytes()[:8] == PNG_MAGIC, name
        assert pixels(run / "plots" / name).std() > 0.01, name
    page = (run / "report.html").read_text()
    assert "<h2>Out-of-scope rejection</h2>" in page and "<strong><code>mahalanobis</code></strong> (deciding)" in page
    assert page.count("data:image/png;base64,") == 3


def test_rejection_plots_show_the_recorded_figures():
    rej = rejection_section()
    _blocks, figs = report.build(synthetic_summary(calibration=CALIBRATION, rejection=rej), [], {}, ["a", "b"])
    # reliability: empty bins skipped, before and after, and the diagonal
    lines = {ln.get_label(): ln for ln in figs["reliability.png"].axes[0].lines}
    assert list(lines["perfectly calibrated"].get_xdata()) == [0, 100]
    before = next(ln for label, ln in lines.items() if label.startswith("before"))
    kept = [i for i, n in enumerate(CALIBRATION["reliability_before"]["count"]) if n]
    assert np.allclose(before.get_xdata(), [100 * CALIBRATION["reliability_before"]["confidence"][i] for i in kept])
    assert np.allclose(before.get_ydata(), [100 * CALIBRATION["reliability_before"]["accuracy"][i] for i in kept])
    # one histogram panel per scorer, the deciding one named
    axes = figs["ood_histograms.png"].axes
    assert [ax.get_title() for ax in axes] == ["msp", "energy", "mahalanobis (deciding)", "knn"]
    # risk–coverage: one line per scorer, in percent
    curves = {ln.get_label(): ln for ln in figs["risk_coverage.png"].axes[0].lines}
    assert list(curves) == ["msp", "energy", "mahalanobis (deciding)", "knn"]
    assert np.allclose(curves["knn"].get_ydata(), [100 * r for r in rej["risk_coverage"]["knn"]["risk"]])


def test_rejection_without_out_of_scope_test_texts_shows_in_scope_figures_only():
    rej = rejection_section(with_oos=False, method="msp")
    blocks, figs = report.build(synthetic_summary(calibration=CALIBRATION, rejection=rej), [], {}, ["a", "b"])
    md = report.to_markdown(blocks)
    assert "| Scorer | Threshold | In-scope kept | In-scope accuracy |\n" in md
    assert "| **`msp`** (deciding) | 0.5 | 95.00% | 88.00% |" in md and "AUROC" not in md.split("| Scorer")[1]
    assert sorted(figs) == ["reliability.png", "risk_coverage.png"]
    rej = rejection_section(method="none")
    md = report.to_markdown(report.build(synthetic_summary(rejection=rej), [], {}, ["a", "b"])[0])
    assert "No score decides (ood.method none)" in md and "(deciding)" not in md
    assert "## Calibration" not in md


def test_report_without_confidence_sections_builds_as_before(tmp_path):
    run = synthetic_run(tmp_path / "old", synthetic_summary())
    md = (run / "report.md").read_text()
    assert "Calibration" not in md and "Out-of-scope" not in md and "(deciding)" not in md
    assert not re.findall(r"\(plots/[^)]+\)", md) and not list((run / "plots").iterdir())
    assert "| **Test accuracy** | **90.00%** |" in md
