"""peftlab compare: the matrix trains once and resumes, the table's numbers are the runs' summary.json,
mean ± std over seeds, plots, --runs, failures marked, budget-matched ranks, one-line config errors."""

import csv
import io
import json
import math
import re
import shutil
import statistics

import numpy as np
import pytest
import yaml

from peftlab import budget, cli, comparison, matrix, modeling, workflows
from peftlab.errors import ConfigError, DataError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ["accuracy_vs_parameters.png", "accuracy_f1.png", "train_time.png"]
METHODS = ["lora", "adalora", "full"]
SEEDS = [0, 1]


def spec(tiny_model, small_data, **extra) -> dict:
    return {"name": "tiny",
            "base": {"model": {"name": str(tiny_model)},
                     "data": {"train_file": str(small_data["train"]), "test_file": str(small_data["test"]),
                              "label_column": "category", "validation_size": 30},
                     "train": {"epochs": 1, "batch_size": 16, "num_threads": 1}},
            "methods": METHODS, "per_method": {"full": {"train.learning_rate": 1.0e-3}}, "seeds": SEEDS, **extra}


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_model, small_data):
    root = tmp_path_factory.mktemp("compare")
    (root / "tiny.yaml").write_text(yaml.safe_dump(spec(tiny_model, small_data)))
    # In-process: a fresh interpreter per run costs ~5 s of imports here; isolation has its own test.
    assert cli.main(["compare", str(root / "tiny.yaml"), "-o", str(root / "out"), "--in-process"]) == 0
    return root


def csv_rows(folder):
    return list(csv.DictReader(io.StringIO((folder / "comparison.csv").read_text())))


def table(folder) -> dict[str, dict[str, str]]:
    """comparison.md's main table as {method: {column: cell}}."""
    lines = [ln for ln in (folder / "comparison.md").read_text().splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header):
            break  # the next table (failed runs) starts
        out[cells[0]] = dict(zip(header, cells, strict=True))
    return out


def rows_from(folder) -> list[dict]:
    """The comparison's per-run rows, rebuilt from the run folders listed in comparison.csv."""
    return [comparison.row(folder / r["run"], folder, r["group"],
                         comparison.Cell(r["method"], "default", int(r["seed"]), None, status="reused"))
            for r in csv_rows(folder)]


def summary(folder, run):
    return json.loads((folder / run / "summary.json").read_text())


def test_compare_writes_one_row_per_method_csv_per_run_and_plots(compared):
    folder = compared / "out" / "tiny"
    assert list(table(folder)) == METHODS
    rows = csv_rows(folder)
    assert [(r["method"], int(r["seed"])) for r in rows] == [(m, s) for m in METHODS for s in SEEDS]
    assert {r["run"] for r in rows} == {f"runs/{m}-default-seed{s}" for m in METHODS for s in SEEDS}
    assert all(r["status"] == "trained" for r in rows)
    md = (folder / "comparison.md").read_text()
    assert re.findall(r"!\[[^\]]*\]\(plots/([^)]+)\)", md) == PLOTS
    from matplotlib.image import imread

    for name in PLOTS:
        assert (folder / "plots" / name).read_bytes()[:8] == PNG_MAGIC
        img = imread(folder / "plots" / name)
        assert img.ndim == 3 and min(img.shape[:2]) > 100 and img.std() > 0.01
    assert f"Command: `peftlab compare {compared / 'tiny.yaml'} -o {compared / 'out'} --in-process`" in md
    assert "shared one process (in-process mode)" in md
    assert "Hardware: platform " in md and "torch " in md and "device cpu" in md
    html = (folder / "comparison.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == 3 and "http" not in html
    assert not list(folder.glob("**/.*tmp"))


def test_csv_numbers_are_each_runs_summary(compared):
    folder = compared / "out" / "tiny"
    for row in csv_rows(folder):
        s = summary(folder, row["run"])
        for key in ("trainable_parameters", "total_parameters", "trainable_percent", "test_accuracy", "test_f1",
                    "train_seconds", "train_samples_per_second", "peak_memory_mb"):
            assert float(row[key]) == s[key], (row["run"], key)
        effective = s.get("adalora", {}).get("effective_trainable_parameters")
        assert row["adalora_effective_parameters"] == ("" if effective is None else str(effective))
        cfg = yaml.safe_load((folder / row["run"] / "config.yaml").read_text())
        assert cfg["train"]["seed"] == int(row["seed"]) and cfg["adapter"]["method"] == row["method"]
        assert row["rank"] == {"lora": "8", "adalora": "8", "full": ""}[row["method"]]
    full = yaml.safe_load((folder / "runs" / "full-default-seed0" / "config.yaml").read_text())
    assert full["train"]["learning_rate"] == 1.0e-3  # per_method reached the cell


def test_table_shows_mean_and_sample_std_over_seeds(compared):
    folder = compared / "out" / "tiny"
    rows = table(folder)
    for method in METHODS:
        runs = [summary(folder, f"runs/{method}-default-seed{s}") for s in SEEDS]
        for key, column in (("test_accuracy", "Test accuracy"), ("test_f1", "Test macro-F1")):
            values = [r[key] for r in runs]
            expected = f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}%"
            assert rows[method][column] == expected
        assert rows[method]["Runs (n)"] == "2"
        assert rows[method]["Trainable parameters"] == f"{runs[0]['trainable_parameters']:,}"
        assert rows[method]["Peak memory MB (max)"] == f"{max(r['peak_memory_mb'] for r in runs):.0f}"
    groups = {g["group"]: g for g in comparison.summarise(rows_from(folder))}
    seconds = [summary(folder, f"runs/lora-default-seed{s}")["train_seconds"] for s in SEEDS]
    assert groups["lora"]["train_seconds"] == pytest.approx((statistics.mean(seconds), statistics.stdev(seconds), 2))
    # the arithmetic itself, on values where n-1 matters
    assert comparison._stats([0.9, 0.8]) == pytest.approx((0.85, math.sqrt(0.005), 2))
    assert comparison._stats([0.5]) == (0.5, None, 1)


def test_accuracy_plot_points_are_the_table_means(compared):
    folder = compared / "out" / "tiny"
    _blocks, figs = comparison.build(rows_from(folder), "tiny", "cmd")
    ax = figs["accuracy_vs_parameters.png"].axes[0]
    assert ax.get_xscale() == "log"
    points = {c.get_label(): c for c in ax.containers}  # one errorbar per method
    assert list(points) == METHODS
    for method in METHODS:
        runs = [summary(folder, f"runs/{method}-default-seed{s}") for s in SEEDS]
        line = points[method].lines[0]
        assert list(line.get_xdata()) == [runs[0]["trainable_parameters"]]
        assert np.isclose(line.get_ydata()[0], 100 * statistics.mean(r["test_accuracy"] for r in runs))


def test_second_invocation_reuses_every_run(compared, monkeypatch, caplog):
    folder = compared / "out" / "tiny"
    mtimes = {p: p.stat().st_mtime_ns for p in folder.glob("runs/*/summary.json")}
    assert len(mtimes) == 6

    def no_training(cfg):
        raise AssertionError(f"trained {cfg.run_name} again")

    monkeypatch.setattr(workflows, "train", no_training)
    monkeypatch.setattr(matrix, "_train_isolated", no_training)
    caplog.set_level("INFO", logger="peftlab")
    assert cli.main(["compare", str(compared / "tiny.yaml"), "-o", str(compared / "out")]) == 0
    assert {p: p.stat().st_mtime_ns for p in folder.glob("runs/*/summary.json")} == mtimes
    lines = [r.getMessage() for r in caplog.records if "reusing" in r.getMessage()]
    assert lines == [f"[{i}/6] reusing {m}-default-seed{s} (finished)" for i, (m, s) in
                     enumerate(((m, s) for m in METHODS for s in SEEDS), 1)]
    assert all(r["status"] == "reused" for r in csv_rows(folder))


def test_a_changed_config_refuses_to_reuse_finished_runs(compared, capsys):
    assert cli.main(["compare", str(compared / "tiny.yaml"), "-o", str(compared / "out"), "train.epochs=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: finished runs in ") and "lora-default-seed0 (train.epochs 1 → 2)" in err
    assert len(err.splitlines()) == 1


def test_unfinished_run_is_retrained_and_a_failing_cell_is_marked(compared, tmp_path, monkeypatch, capsys):
    shutil.copytree(compared / "out", tmp_path / "out")
    folder = tmp_path / "out" / "tiny"
    (folder / "runs" / "lora-default-seed1" / "summary.json").unlink()
    (folder / "runs" / "full-default-seed0" / "summary.json").unlink()
    real_train, trained = workflows.train, []

    def train(cfg):
        trained.append(cfg.run_name)
        if cfg.adapter.method == "full":
            raise DataError("boom: no data for full")
        return real_train(cfg)

    monkeypatch.setattr(workflows, "train", train)
    assert cli.main(["compare", str(compared / "tiny.yaml"), "-o", str(tmp_path / "out"), "--in-process"]) == 1
    assert trained == ["lora-default-seed1", "full-default-seed0"]
    assert (folder / "runs" / "lora-default-seed1" / "summary.json").is_file()
    status = {r["run"]: (r["status"], r["error"]) for r in csv_rows(folder)}
    assert status["runs/lora-default-seed1"] == ("trained", "")
    assert status["runs/full-default-seed0"] == ("failed", "boom: no data for full")
    assert status["runs/lora-default-seed0"] == ("reused", "")
    rows = table(folder)
    assert rows["full"]["Runs (n)"] == "1 of 2" and rows["lora"]["Runs (n)"] == "2"
    md = (folder / "comparison.md").read_text()
    assert "## Failed or skipped runs" in md and "| `runs/full-default-seed0` | failed | boom: no data for full |" in md
    assert "(1 of 6 runs failed or skipped)" in capsys.readouterr().out


def test_each_run_trains_in_its_own_process_and_a_failure_there_is_marked(tiny_model, small_data, tmp_path,
                                                                       monkeypatch, capsys):
    def in_this_process(cfg):
        raise AssertionError("trained in the compare's own process")

    monkeypatch.setattr(workflows, "train", in_this_process)
    # 14 optimizer steps: this AdaLoRA schedule only fails once the data is loaded, inside the child
    s = spec(tiny_model, small_data, methods=["lora", "adalora"], seeds=[0],
             per_method={"adalora": {"adapter.tinit": 10, "adapter.tfinal": 10}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(s))
    assert cli.main(["compare", str(tmp_path / "c.yaml"), "-o", str(tmp_path)]) == 1
    folder = tmp_path / "tiny"
    status = {r["method"]: (r["status"], r["error"]) for r in csv_rows(folder)}
    assert status["lora"] == ("trained", "")
    assert status["adalora"] == ("failed", "adapter.tinit + adapter.tfinal (10 + 10) must be less than the total "
                                 "optimizer steps (14): lower them, or train for more steps (train.epochs, smaller "
                                 "train.batch_size)")
    assert (folder / "runs" / "lora-default-seed0" / "summary.json").is_file()
    assert "in-process" not in (folder / "comparison.md").read_text()
    assert "(1 of 2 runs failed or skipped)" in capsys.readouterr().out


def test_runs_mode_compares_finished_folders(compared, tmp_path, capsys):
    runs = compared / "out" / "tiny" / "runs"
    out = tmp_path / "cmp"
    given = [runs / "lora-default-seed0", runs / "lora-default-seed1", runs / "full-default-seed1"]
    assert cli.main(["compare", "--runs", *map(str, given), "-o", str(out)]) == 0
    rows = table(out)
    assert list(rows) == ["lora", "full"] and rows["lora"]["Runs (n)"] == "2" and rows["full"]["Runs (n)"] == "1"
    for row in csv_rows(out):
        assert float(row["test_accuracy"]) == summary(out, row["run"])["test_accuracy"]
    capsys.readouterr()
    broken = tmp_path / "broken"
    shutil.copytree(runs / "lora-default-seed0", broken)
    (broken / "summary.json").unlink()
    assert cli.main(["compare", "--runs", str(broken), "-o", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"error: run '{broken}' did not finish (no summary.json); train it again"


def test_runs_mode_names_what_sets_runs_of_one_method_apart(compared, tmp_path):
    runs = compared / "out" / "tiny" / "runs"
    other = tmp_path / "lora-r4"
    shutil.copytree(runs / "lora-default-seed0", other)
    cfg = (other / "config.yaml").read_text()
    (other / "config.yaml").write_text(cfg.replace("  r: 8\n", "  r: 4\n", 1))
    matrix.compare_runs([runs / "lora-default-seed0", other], tmp_path / "cmp")
    assert list(table(tmp_path / "cmp")) == ["lora (adapter.r=8)", "lora (adapter.r=4)"]


@pytest.mark.parametrize("value,count", [("1M", 1_000_000), ("1.5M", 1_500_000), ("150k", 150_000),
                                         (150000, 150_000), ("2.5K", 2_500)])
def test_budget_values(value, count):
    assert budget.parse_budget(value) == count


def independent_count(model, method: str) -> int:
    """Parameters against the budget, counted here from module shapes (not through peftlab's helpers)."""
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
    if method != "adalora":
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    for m in model.modules():
        if hasattr(m, "lora_E") and "default" in m.lora_E:
            r = m.lora_E["default"].shape[0]
            trainable += r * (m.in_features + m.out_features) + r
    return trainable - sum(p.numel() for n, p in model.named_parameters() if "ranknum" in n and p.requires_grad)


def test_budget_mode_picks_the_largest_rank_within_the_budget(tiny_model, small_data, tmp_path):
    import dataclasses

    from peftlab import data

    limit = 3000
    plan = matrix.load(spec(tiny_model, small_data, methods=["full", "lora", "adalora", "dora"], seeds=[0],
                             per_method={}, budget="3k"), output_dir=str(tmp_path))
    chosen = budget.choose_ranks(plan.cells, plan.budget)
    id2label = data.load(plan.cells[0].config.data, 0).labels.id2label
    assert chosen["full-default"]["over_budget"] and chosen["full-default"]["parameters"] > limit
    for cell in plan.cells[1:]:
        r = chosen[f"{cell.method}-default"]["rank"]
        a = cell.config.adapter
        assert (a.r, a.target_r, a.init_r) == (r, r, math.ceil(1.5 * r))
        counts = []
        for rank in (r, r + 1):
            adapter = dataclasses.replace(a, r=rank, init_r=rank, target_r=rank)
            model = modeling.build(cell.config.model, adapter, id2label, 100, (10, 20))[0]
            counts.append(independent_count(model, cell.method))
        assert counts[0] == chosen[f"{cell.method}-default"]["parameters"]
        assert counts[0] <= limit < counts[1], (cell.method, r, counts)


def test_budget_mode_trains_at_the_chosen_ranks_and_reports_them(tiny_model, small_data, tmp_path):
    s = spec(tiny_model, small_data, methods=["lora", "adalora"], seeds=[0], per_method={}, budget=3000)
    folder = matrix.run(s, output_dir=str(tmp_path), isolate=False)
    rows = table(folder)
    for row in csv_rows(folder):
        sm = summary(folder, row["run"])
        used = sm.get("adalora", {}).get("effective_trainable_parameters", sm["trainable_parameters"])
        assert int(row["budget_parameters"]) == used <= 3000 and int(row["budget"]) == 3000
        assert rows[row["method"]]["Budget used (of 3,000)"] == f"{used:,} ({100 * used / 3000:.1f}%)"
    assert rows["lora"]["Rank"] == "10" and rows["adalora"]["Rank"] == "10 (init 15)"


@pytest.mark.parametrize("change,message", [
    ({"method": ["lora"]}, "unknown compare key 'method' — did you mean 'methods'?"),
    ({"methods": ["full", "dorra"]}, "methods: unknown method 'dorra' — did you mean 'dora'?"),
    ({"seeds": [1, 1]}, "seeds: expected a non-empty list of distinct int, got [1, 1]"),
    ({"budget": "lots"}, "budget: expected a parameter count like 1M, 1.5M, 150k or 150000, got 'lots'"),
    ({"settings": {"x": {"adapter.method": "dora"}}}, "settings.x: adapter.method is set by methods; remove it here"),
    ({"budget": "1M", "per_method": {"lora": {"adapter.r": 4}}}, "per_method.lora: adapter.r is set by budget"),
    ({"per_method": {"lorra": {}}}, "per_method: 'lorra' is not in methods — did you mean 'lora'?"),
    ({"overrides": {"train.lerning_rate": 1}},
     "unknown key 'train.lerning_rate' — did you mean 'train.learning_rate'?"),
    ({"per_method": {"adalora": {"adapter.target_r": 20}}},
     "adapter.target_r (20) must not exceed adapter.init_r (12) (in adalora-default-seed0, adalora-default-seed1)"),
])
def test_config_mistakes_are_one_line_errors_with_exit_code_2(tiny_model, small_data, tmp_path, capsys, change,
                                                              message):
    s = spec(tiny_model, small_data)
    s.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(s))
    assert cli.main(["compare", str(path), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "tiny").exists()  # nothing trained
    with pytest.raises(ConfigError):
        matrix.load(path)


@pytest.mark.parametrize("args,message", [
    (["compare", "missing.yaml"], "error: compare config 'missing.yaml' not found"),
    (["compare"], "error: compare needs a compare config (COMPARE.yaml) or --runs RUN …"),
    (["compare", "--runs", "a"], "error: compare --runs needs -o DIR: the folder for comparison.md/.csv"),
])
def test_cli_usage_mistakes(args, message, capsys):
    assert cli.main(args) == 2
    assert capsys.readouterr().err.strip() == message


def test_base_may_be_a_train_config_path_and_layers_apply_in_order(tiny_model, small_data, tmp_path):
    s = spec(tiny_model, small_data)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({**s["base"], "run_name": "ignored", "output_dir": "x"}))
    s.update(base="train.yaml", overrides=["train.epochs=3", "adapter.r=4"],
             settings={"small": {"adapter.r": 2}, "wide": {"train": {"batch_size": 8}}},
             per_method={"lora": {"adapter.r": 16, "train.warmup_ratio": 0.2}}, methods=["lora", "dora"], seeds=[7])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(s))
    plan = matrix.load(tmp_path / "c.yaml", ["train.warmup_ratio=0.3"], output_dir=str(tmp_path / "o"))
    cells = {c.name: c.config for c in plan.cells}
    assert list(cells) == ["lora-small-seed7", "lora-wide-seed7", "dora-small-seed7", "dora-wide-seed7"]
    # base → overrides → per_method → setting → command line
    assert [cells[n].adapter.r for n in cells] == [2, 16, 2, 4]
    assert {cells[n].train.warmup_ratio for n in cells} == {0.3}
    assert [cells[n].train.batch_size for n in cells] == [16, 8, 16, 8]
    c = cells["dora-wide-seed7"]
    assert (c.train.epochs, c.train.seed, c.adapter.method, c.run_name) == (3, 7, "dora", "dora-wide-seed7")
    assert c.output_dir == str(tmp_path / "o" / "tiny" / "runs") and c.data.label_column == "category"


def fake_run(folder, name: str, method: str, seed: int, accuracy: float, confidence: dict | None = None):
    """A finished run folder with just what comparison.row reads (config.yaml, labels.json, summary.json),
    its summary with or without the calibration/rejection sections (older runs have neither)."""
    run = folder / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"adapter": {"method": method, "r": 8, "target_r": 8, "init_r": 12},
                                                     "train": {"seed": seed}}))
    (run / "labels.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b"}}))
    s = {"dataset": "banking77", "trainable_parameters": 1000, "total_parameters": 100_000, "trainable_percent": 1.0,
         "test_accuracy": accuracy, "test_f1": accuracy - 0.01, "best_epoch": 1, "train_seconds": 60.0,
         "train_samples_per_second": 100.0, "peak_memory_mb": 500.0, "device": "cpu", **(confidence or {})}
    (run / "summary.json").write_text(json.dumps(s))
    return comparison.Cell(method, "default", seed, None, status="reused"), run


def sections(ece: float, method: str, scorer: dict) -> dict:
    return {"calibration": {"temperature": 1.4, "ece_before": 2 * ece, "ece_after": ece},
            "rejection": {"method": method, "threshold": scorer.get("threshold"),
                          "scorers": {"msp": {"threshold": 0.5, "oos_f1": 0.1, "auroc": 0.2, "fpr_at_95": 0.3,
                                              "in_scope_accuracy": 0.4},
                                      "knn": scorer}}}


CONFIDENCE_HEADERS = ["ECE (after scaling)", "OOS F1", "OOS AUROC", "FPR@95", "In-scope accuracy"]


def test_confidence_columns_come_from_the_deciding_scorer_and_only_when_recorded(tmp_path):
    knn = [{"threshold": 0.7, "oos_f1": f1, "auroc": 0.9, "fpr_at_95": fpr, "in_scope_accuracy": acc}
           for f1, fpr, acc in ((0.8, 0.2, 0.85), (0.9, 0.1, 0.95))]
    made = [("lora", fake_run(tmp_path / "runs", f"lora-{s}", "lora", s, 0.9, sections(0.01 * (s + 1), "knn", knn[s])))
            for s in (0, 1)]
    made.append(("dora", fake_run(tmp_path / "runs", "dora-0", "dora", 0, 0.9, sections(0.05, "none", {}))))
    made.append(("full", fake_run(tmp_path / "runs", "full-0", "full", 0, 0.8)))  # an older run: neither section
    rows = [comparison.row(run, tmp_path, group, cell) for group, (cell, run) in made]
    comparison.write(tmp_path, rows, "fake", "cmd")

    by_run = {r["run"]: r for r in csv_rows(tmp_path)}
    assert all(k in csv_rows(tmp_path)[0] for k in ("ece_after", "oos_f1", "auroc", "fpr_at_95", "in_scope_accuracy"))
    assert [by_run["runs/lora-1"][k] for k in ("ece_after", "oos_f1", "auroc", "fpr_at_95", "in_scope_accuracy")] == \
        ["0.02", "0.9", "0.9", "0.1", "0.95"]  # knn decides: not msp's figures
    assert by_run["runs/dora-0"]["ece_after"] == "0.05" and by_run["runs/dora-0"]["oos_f1"] == ""  # method none
    assert all(by_run["runs/full-0"][k] == "" for k in ("ece_after", "oos_f1", "auroc", "fpr_at_95",
                                                        "in_scope_accuracy"))

    rows_md = table(tmp_path)
    assert all(h in rows_md["lora"] for h in CONFIDENCE_HEADERS)
    lora = rows_md["lora"]
    assert lora["ECE (after scaling)"] == f"1.50 ± {100 * statistics.stdev([0.01, 0.02]):.2f}%"
    assert lora["OOS F1"] == f"85.00 ± {100 * statistics.stdev([0.8, 0.9]):.2f}%"
    assert lora["OOS AUROC"] == "90.00 ± 0.00%" and lora["In-scope accuracy"].startswith("90.00 ± ")
    assert rows_md["dora"]["ECE (after scaling)"] == "5.00%" and rows_md["dora"]["OOS F1"] == "—"
    assert all(rows_md["full"][h] == "—" for h in CONFIDENCE_HEADERS)
    assert "OOS AUROC" in (tmp_path / "comparison.html").read_text()

    old = tmp_path / "old"
    only_old = [comparison.row(run, old, group, cell) for group, (cell, run) in made[3:]]
    comparison.write(old, only_old, "old", "cmd")
    assert not set(CONFIDENCE_HEADERS) & set(table(old)["full"])
    assert csv_rows(old)[0]["ece_after"] == "" and csv_rows(old)[0]["auroc"] == ""
