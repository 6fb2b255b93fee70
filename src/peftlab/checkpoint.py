"""Resumable training state: what fit() needs to continue an interrupted run exactly where it stopped.

A state is a folder ``checkpoints/state-STEP/`` holding

    tensors.safetensors   trainable weights, optimizer moments, RNG states, AdaLoRA importance scores
    state.json            step, position in the epoch, scheduler, optimizer hyper-parameters, loop counters

Nothing is pickled, so resuming never unpickles a file someone may have planted. A state is written
into a temporary folder, every file fsynced, the folder renamed, and only then does
``checkpoints/latest.json`` (itself written atomically) point at it: a kill at any instant leaves either
the previous state or the new one, never half of one. Older states are removed after the pointer moves.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import RunError
from .runs import write_json, write_safetensors

POINTER = "latest.json"


@dataclass
class State:
    tensors: dict[str, torch.Tensor]
    meta: dict

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors saved under ``prefix.``, with the prefix removed."""
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


def optimizer_to_flat(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON (hyper-parameters, scalars)."""
    tensors, scalars = {}, {}
    for idx, entry in state_dict["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save(ckpt_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write one complete state and point ``latest.json`` at it; return its folder."""
    ckpt_dir = Path(ckpt_dir)
    name = f"state-{step}"
    tmp = ckpt_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_safetensors(tmp / "tensors.safetensors", {k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    write_json(tmp / "state.json", meta)
    final = ckpt_dir / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(ckpt_dir)
    write_json(ckpt_dir / POINTER, {"state": name, "step": step})
    for old in ckpt_dir.glob("state-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(ckpt_dir: Path) -> State | None:
    """The latest complete state, or None when the run never wrote one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    pointer = Path(ckpt_dir) / POINTER
    if not pointer.is_file():
        return None
    try:
        folder = Path(ckpt_dir) / json.loads(pointer.read_text())["state"]
        meta = json.loads((folder / "state.json").read_text())
        tensors = load_file(folder / "tensors.safetensors")
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise RunError(f"the resume state in '{ckpt_dir}' is unreadable ({type(e).__name__}: {e}); "
                       "delete that folder to train from the start") from None
    return State(tensors, meta)


def clean_partial(ckpt_dir: Path) -> None:
    """Remove what a kill left mid-write: temporary state folders and checkpoint files."""
    for tmp in Path(ckpt_dir).glob(".*.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
