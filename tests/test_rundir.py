"""The run-folder contract: creation never loses a finished run, opening says what is wrong, identity
compares what matters, a run reads its own data again from anywhere and notices a changed file, and every
write is atomic."""

from __future__ import annotations

import json
import logging
import shutil

import pandas as pd
import pytest
from conftest import tiny_overrides

from peftlab import cli, config, files, rundir, workflows
from peftlab.errors import DataError, RunError


def test_new_run_dir_keeps_finished_runs_and_cleans_unfinished_ones(tmp_path):
    run = rundir.new_run_dir(str(tmp_path), "r", "d", "lora")
    for name in ("metrics.jsonl", "report.md"):
        (run / name).write_text("old")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest.json").write_text("{}")
    rundir.new_run_dir(str(tmp_path), "r", "d", "lora", resume=True)  # continuing: metrics and state stay
    assert (run / "metrics.jsonl").exists() and (run / "checkpoints").exists() and not (run / "report.md").exists()
    rundir.new_run_dir(str(tmp_path), "r", "d", "lora")  # starting over: both go
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    (run / "summary.json").write_text("{}")
    with pytest.raises(RunError, match="already holds a finished run"):
        rundir.new_run_dir(str(tmp_path), "r", "d", "lora")
    assert rundir.new_run_dir(str(tmp_path), None, "banking77", "dora").name.startswith("banking77-dora-")


def test_open_run_says_what_is_wrong(tmp_path):
    with pytest.raises(RunError, match="not found"):
        rundir.open_run(tmp_path / "nope")
    with pytest.raises(RunError, match=r"is not a peftlab run folder \(no config.yaml / labels.json\)"):
        rundir.open_run(tmp_path)
    (tmp_path / "config.yaml").write_text("adapter: {method: lora}\n")
    (tmp_path / "labels.json").write_text('{"id2label": {"0": "a"}}')
    with pytest.raises(RunError, match=r"did not finish .*; train it again"):
        rundir.open_run(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.json").write_text("{}")
    with pytest.raises(RunError, match="continue it with peftlab train --resume"):
        rundir.open_run(tmp_path)
    (tmp_path / "summary.json").write_text("{}")
    assert rundir.open_run(tmp_path)[1] == {"adapter": {"method": "lora"}}


def test_identity_matches_resolved_values_and_ignores_where_a_run_ran(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load(overrides=["data.train_file=t.csv", "data.test_file=t.csv", "run_name=x"])
    recorded = rundir.resolved_config(cfg)
    assert recorded["train"]["learning_rate"] == 5e-3 and recorded["data"]["train_file"] == str(tmp_path / "t.csv")
    assert rundir.differences(cfg, recorded) == []
    (tmp_path / "t.csv").write_text("text,label\n")
    old = json.loads(json.dumps(recorded))
    old["data"]["train_file"] = "t.csv"  # recorded as given by an older peftlab: the same file
    old["output_dir"], old["train"]["num_threads"] = "elsewhere", 7  # not identity
    del old["adapter"]["bias"]  # a key from a later peftlab
    assert rundir.differences(cfg, old) == []
    old["train"]["learning_rate"] = 0.01
    assert rundir.differences(cfg, old) == ["train.learning_rate 0.01 → 0.005"]


@pytest.fixture
def own_data_run(tmp_path, tiny_model, small_data):
    """A finished tiny run on data files of its own (so the test may change them)."""
    data = {k: tmp_path / f"{k}.csv" for k in ("train", "test")}
    for k, f in data.items():
        shutil.copy(small_data[k], f)
    assert cli.main(["train", *tiny_overrides(tiny_model, data, tmp_path / "runs", "lora", **{"train.epochs": 1})]) == 0
    return tmp_path / "runs" / "lora", data


def test_a_run_reads_its_test_split_from_anywhere_and_notices_a_changed_file(own_data_run, tmp_path, monkeypatch,
                                                                               caplog):
    run, data = own_data_run
    monkeypatch.chdir(tmp_path / "runs")  # another working directory
    summary = rundir.read_summary(run)
    assert workflows.evaluate(run)["accuracy"] == summary["test_accuracy"]
    test = pd.read_csv(data["test"])
    pd.concat([test, test.head(1)]).to_csv(data["test"], index=False)  # one more row
    with pytest.raises(DataError, match=r"^test file '.*test\.csv' changed since training \([\d,]+ bytes then, "
                                        r"[\d,]+ now; SHA-256 differs\): the run's test split cannot be read again"):
        workflows.evaluate(run)
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        frame = rundir.test_split(run, rundir.open_run(run)[1], strict=False)
    assert len(frame) == 61 and "changed since training" in caplog.text


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    target = tmp_path / "f.json"
    files.write_json(target, {"v": 1})
    with pytest.raises(ZeroDivisionError), files.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise ZeroDivisionError
    assert files.read_json(target) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["f.json"]
    folder = tmp_path / "d"
    with files.atomic_folder(folder) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ZeroDivisionError), files.atomic_folder(folder) as tmp:
        (tmp / "b").write_text("2")
        raise ZeroDivisionError
    assert [p.name for p in folder.iterdir()] == ["a"] and sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.json"]
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"ste')  # torn by a crash
    assert files.read_jsonl(tmp_path / "m.jsonl") == [{"step": 1}, {"step": 2}]
