"""Experiment tracking: each evaluation, the final test metrics and the hyperparameters go to
TensorBoard, MLflow and/or Weights & Biases (``train.report_to``), each through its own client.

Every back-end is an optional extra, imported only when asked for; a missing one is a one-line
ConfigError with its install line, raised by ``check`` before any data is loaded. Everything is local
by default: TensorBoard event files, an MLflow file store and W&B offline runs, all under
``train.tracking_dir`` (default ``<run>/tracking``). No tracker state is process-global where the
library allows it (MlflowClient rather than mlflow.start_run; W&B runs created with reinit), so a
notebook's own active runs are left alone.

The metrics are exactly the records loop.fit appends to metrics.jsonl (through its ``on_eval``
callback), logged at their optimizer step.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .config import TrainConfig, dotted
from .errors import ConfigError

log = logging.getLogger("peftlab")

# back-end → (module that must import, extra that installs it)
REQUIREMENTS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
                "wandb": ("wandb", "wandb")}
# Test-time figures from summary.json that are logged with the test metrics.
FINAL_KEYS = ("test_accuracy", "test_f1", "test_loss", "train_seconds", "train_samples_per_second",
              "peak_memory_mb", "trainable_parameters", "trainable_percent")


def check(report_to: list[str]) -> None:
    """Fail before training when a requested back-end's library is not installed."""
    for name in dict.fromkeys(report_to):
        if importlib.util.find_spec(REQUIREMENTS[name][0]) is None:
            raise ConfigError(_missing(name))


def _import(name: str):
    try:
        return __import__(REQUIREMENTS[name][0])
    except ImportError:
        raise ConfigError(_missing(name)) from None


def _missing(name: str) -> str:
    module, extra = REQUIREMENTS[name]
    return f"train.report_to={name} needs the {module} package: pip install 'peftlab[{extra}]'"


def flatten(config: dict) -> dict[str, object]:
    """{'train': {'epochs': 5}} → {'train.epochs': 5}; lists and None become strings, as trackers want
    scalars for hyperparameters."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in dotted(config).items()}


def _numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass
class Backend:
    """One open tracker: how to log a dict of numbers at a step, and how to close (ok or failed)."""

    name: str
    log: Callable[[dict[str, float], int], None]
    close: Callable[[bool], None]


@dataclass
class Tracker:
    """The open back-ends of one run; a context manager that closes them, as failed on an exception."""

    backends: list[Backend] = field(default_factory=list)

    def log_eval(self, record: dict) -> None:
        """loop.fit's on_eval: one metrics.jsonl record, at its optimizer step."""
        self._log(_numbers(record), int(record["step"]))

    def log_final(self, summary: dict, step: int) -> None:
        extra = summary.get("adalora", {}).get("effective_trainable_parameters")
        values = {k: summary[k] for k in FINAL_KEYS if isinstance(summary.get(k), (int, float))}
        if extra is not None:
            values["adalora_effective_parameters"] = extra
        if "calibration" in summary:
            values["test_ece"] = summary["calibration"]["ece_after"]
        rejection = summary.get("rejection", {})
        deciding = rejection.get("scorers", {}).get(rejection.get("method"), {})
        values.update({f"test_{k}": deciding[k] for k in ("oos_f1", "auroc", "fpr_at_95", "in_scope_accuracy")
                       if k in deciding})
        self._log(_numbers(values), step)

    def _log(self, values: dict[str, float], step: int) -> None:
        for b in self.backends:
            b.log(values, step)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for b in self.backends:
            try:
                b.close(exc_type is None)
            except Exception as e:  # a tracker that cannot close must not hide the run's own outcome
                log.warning("closing %s failed: %s", b.name, e)


def start(cfg: TrainConfig, run_dir: Path, config: dict, enabled: bool = True) -> Tracker:
    """Open the back-ends in ``cfg.report_to`` for the run in ``run_dir``; ``config`` is the resolved
    config (logged as hyperparameters). ``enabled=False`` (non-main processes) opens nothing."""
    if not enabled or not cfg.report_to:
        return Tracker()
    run_dir = Path(run_dir)
    if cfg.tracking_dir is None:
        folder = run_dir / "tracking"
        # A run folder restarted after a crash keeps its name: drop the dead attempt's tracking files so
        # its curves do not overlap the new ones (the folder is this run's own).
        shutil.rmtree(folder, ignore_errors=True)
    else:
        folder = Path(cfg.tracking_dir)
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    params = flatten({k: v for k, v in config.items() if not k.startswith("_")})
    opened = Tracker()
    try:
        for name in dict.fromkeys(cfg.report_to):
            opened.backends.append(OPENERS[name](folder, run_dir.name, cfg.tracking_project, params))
            log.info("tracking to %s under %s", name, folder)
    except BaseException:
        opened.__exit__(RuntimeError, None, None)
        raise
    return opened


# ------------------------------------------------------------------------------------ back-ends

def _tensorboard(folder: Path, run_name: str, project: str, params: dict) -> Backend:
    _import("tensorboard")
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    writer = SummaryWriter(log_dir=str(folder / "tensorboard" / run_name))
    # Hyperparameters into this run's own event file (SummaryWriter.add_hparams would open a new
    # sub-run); the metric names declare which scalars the HParams tab shows next to them.
    for summary in hparams(params, {"test_accuracy": 0.0, "test_f1": 0.0}):
        writer.file_writer.add_summary(summary)

    def log_values(values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            writer.add_scalar(key, value, step)
        writer.flush()

    return Backend("tensorboard", log_values, lambda ok: writer.close())


def _mlflow(folder: Path, run_name: str, project: str, params: dict) -> Backend:
    _import("mlflow")
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    uri = os.environ.get("MLFLOW_TRACKING_URI") or (folder / "mlruns").as_uri()
    if uri.startswith("file:"):
        # MLflow 3 keeps the file store in maintenance mode and refuses it unless opted in; it is the
        # one local back-end that needs no database packages, so peftlab opts in for it.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(project)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(project)
    run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
    items = [Param(k, str(v)[:500]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i:i + 100])

    def log_values(values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    return Backend("mlflow", log_values, lambda ok: client.set_terminated(run_id, "FINISHED" if ok else "FAILED"))


def _wandb(folder: Path, run_name: str, project: str, params: dict) -> Backend:
    wandb = _import("wandb")
    # Offline unless the user chose otherwise (WANDB_MODE=online after `wandb login`): a run must
    # never need an account or the network. `wandb sync <folder>/wandb/offline-run-*` uploads later.
    run = wandb.init(project=project, name=run_name, dir=str(folder), config=params, reinit="create_new",
                     mode=os.environ.get("WANDB_MODE", "offline"),
                     settings=wandb.Settings(silent=True, console="off", disable_git=True, x_disable_stats=True))

    def log_values(values: dict[str, float], step: int) -> None:
        run.log(values, step=step)

    return Backend("wandb", log_values, lambda ok: run.finish(exit_code=0 if ok else 1))


OPENERS: dict[str, Callable[[Path, str, str, dict], Backend]] = {
    "tensorboard": _tensorboard, "mlflow": _mlflow, "wandb": _wandb}
