"""Experiment tracking, offline: TensorBoard event files, an MLflow file store and a W&B offline run get
each evaluation (at its optimizer step), the test metrics and the hyperparameters of one tiny run."""

import importlib.util
import json

import pytest
from conftest import tiny_overrides

from peftlab import cli, config, tracking
from peftlab.config import TrainConfig
from peftlab.errors import ConfigError

BACKENDS = [b for b in ("tensorboard", "mlflow", "wandb") if importlib.util.find_spec(b)]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, small_data):
    if not BACKENDS:
        pytest.skip("no tracking library installed (pip install 'peftlab[tensorboard,mlflow,wandb]')")
    out = tmp_path_factory.mktemp("tracking")
    mp = pytest.MonkeyPatch()
    mp.delenv("WANDB_MODE", raising=False)  # the default must be offline
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        assert cli.main(["train", *tiny_overrides(tiny_model, small_data, out, "lora",
                                                  **{"train.report_to": ",".join(BACKENDS)})]) == 0
    finally:
        mp.undo()
    path = out / "lora"
    history = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return path, history, json.loads((path / "summary.json").read_text())


def test_tensorboard_events_hold_each_evaluation_at_its_step(run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, history, summary = run
    events = EventAccumulator(str(path / "tracking" / "tensorboard" / path.name))
    events.Reload()
    assert len(history) == 2
    acc = events.Scalars("eval_accuracy")
    assert [e.step for e in acc] == [h["step"] for h in history]
    assert [e.value for e in acc] == pytest.approx([h["eval_accuracy"] for h in history])
    assert [e.value for e in events.Scalars("eval_loss")] == pytest.approx([h["eval_loss"] for h in history])
    (test,) = events.Scalars("test_accuracy")
    assert test.step == summary["optimizer_steps"] and test.value == pytest.approx(summary["test_accuracy"])
    (ece,) = events.Scalars("test_ece")  # the calibrated test ECE, tracked too
    assert ece.value == pytest.approx(summary["calibration"]["ece_after"])
    # the hyperparameters as TensorBoard's HParams plugin reads them
    assert "_hparams_/session_start_info" in events.summary_metadata


def test_mlflow_file_store_holds_the_run(run, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    path, history, summary = run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (path / "tracking" / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    found = mlflow.search_runs(experiment_names=["peftlab"], output_format="list")
    assert len(found) == 1
    r = found[0]
    assert r.info.run_name == path.name and r.info.status == "FINISHED"
    assert r.data.metrics["eval_accuracy"] == pytest.approx(history[-1]["eval_accuracy"])
    assert r.data.metrics["test_f1"] == pytest.approx(summary["test_f1"])
    assert r.data.params["train.epochs"] == "2" and r.data.params["adapter.method"] == "lora"
    steps = mlflow.MlflowClient().get_metric_history(r.info.run_id, "eval_accuracy")
    assert [m.step for m in steps] == [h["step"] for h in history]


def test_wandb_writes_an_offline_run(run):
    pytest.importorskip("wandb")
    path, _history, _summary = run
    (folder,) = (path / "tracking" / "wandb").glob("offline-run-*")
    (log,) = folder.glob("run-*.wandb")
    data = log.read_bytes()  # W&B's own record log: the metric and config names are stored as text
    for name in (b"eval_accuracy", b"test_accuracy", b"train.learning_rate"):
        assert name in data, name


def test_the_default_tracks_nothing_and_writes_nothing(tmp_path):
    assert config.load().train.report_to == []
    tracker = tracking.start(TrainConfig(), tmp_path / "run", {})
    assert tracker.backends == [] and not (tmp_path / "run").exists()
    tracker.log_eval({"step": 1, "eval_accuracy": 0.5})  # a no-op, not an error


def test_a_missing_library_is_a_one_line_error_before_any_work(tiny_model, small_data, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    args = tiny_overrides(tiny_model, small_data, tmp_path, "lora", **{"train.report_to": "mlflow"})
    assert cli.main(["train", *args]) == 2
    assert capsys.readouterr().err.strip() == ("error: train.report_to=mlflow needs the mlflow package: "
                                               "pip install 'peftlab[mlflow]'")
    assert not (tmp_path / "lora").exists()


def test_report_to_is_validated_with_a_did_you_mean():
    with pytest.raises(ConfigError) as e:
        config.load(overrides=["train.report_to=tensorboard,mlfow"])
    assert str(e.value) == ("train.report_to: expected a list of one of tensorboard, mlflow, wandb, got "
                            "'tensorboard,mlfow' — did you mean 'mlflow'?")
    with pytest.raises(ConfigError, match=r"got \['wandb', 'tensorbord'\] — did you mean 'tensorboard'\?$"):
        config.load(overrides=["train.report_to=[wandb, tensorbord]"])


def test_a_failed_run_is_closed_as_failed(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    cfg = TrainConfig(report_to=["mlflow"], tracking_dir=str(tmp_path / "t"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RuntimeError), tracking.start(cfg, tmp_path / "run", {"train": {"epochs": 1}}) as tracker:
        tracker.log_eval({"step": 3, "eval_accuracy": 0.25})
        raise RuntimeError("crash")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "t" / "mlruns").as_uri())
    (r,) = mlflow.search_runs(experiment_names=["peftlab"], output_format="list")
    assert r.info.status == "FAILED" and r.data.metrics["eval_accuracy"] == 0.25
