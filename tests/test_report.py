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
COMMON = ["validation.png", "loss.png", "per_class_f1.png", "confused_pairs.png", "confusion.png"]
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
