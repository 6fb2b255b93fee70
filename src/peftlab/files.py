"""Every file peftlab writes goes through here: written atomically (a temporary file beside the target,
fsynced, renamed over it), so a crash leaves the old file or the new one, never half of one. Also the
readers for the formats peftlab writes (JSON, JSONL with a torn last line, YAML with one-line errors).
No torch import.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from .errors import ConfigError

# The process umask, read once (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: Path):
    """A temporary file beside ``path`` to write; on success it is fsynced and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (reports are shared).
        os.fchmod(fd, 0o666 & ~_UMASK)
        os.close(fd)
        yield Path(tmp)
        fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync(path: Path) -> None:
    """Flush a file's, or a folder's entries', bytes to disk (a rename is durable once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(path: Path):
    """A temporary folder ``.NAME.tmp`` beside ``path`` to fill; on success it replaces ``path`` whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_safetensors(path: Path, tensors: dict) -> None:
    """Tensors to a safetensors file. safetensors writes from the tensors' own memory: no serialised copy
    of the whole file is held (full fine-tuning's checkpoints are ~90 MB)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # safetensors replaces the file with a 0600 one


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


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_yaml(path: Path, what: str, shape: str = "a mapping of keys") -> dict:
    """A YAML mapping from ``path``; a missing file, bad YAML or another shape is a one-line ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} '{path}' must hold {shape}")
    return raw
