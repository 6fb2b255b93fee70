"""Checkpoints: the loop's state, the resume state that continues an interrupted run exactly where it
stopped, and the best-k checkpoints that the run keeps while it trains.

A resume state is a folder ``checkpoints/state-STEP/`` holding

    tensors.safetensors   trainable weights, optimizer moments, RNG states, AdaLoRA importance scores
    state.json            the LoopState, the optimizer's hyper-parameters, the scheduler, AdaLoRA's rank pattern

Nothing is pickled, so resuming never unpickles a file someone may have planted. A state is written
into a temporary folder, every file fsynced, the folder renamed, and only then does
``checkpoints/latest.json`` (itself written atomically) point at it: a kill at any instant leaves either
the previous state or the new one, never half of one. Older states, and best-k files that fell out of
the best k, are removed after the pointer moves.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import modeling
from .errors import RunError
from .files import atomic_folder, read_json, write_json, write_safetensors

POINTER = "latest.json"


@dataclass
class LoopState:
    """Everything fit() changes besides the model, optimizer and scheduler: plain values, saved as JSON."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0  # the epoch in progress (0-based)
    batches_done: int = 0  # batches of that epoch already trained
    examples_seen: int = 0
    train_seconds: float = 0.0
    running_loss: float = 0.0  # sum of batch losses since the last evaluation
    running_n: int = 0
    evals_without_gain: int = 0
    best: dict = field(default_factory=dict)  # the best evaluation record, with its "score"
    history: list[dict] = field(default_factory=list)  # every evaluation record (metrics.jsonl)
    rank_history: list[list[int]] = field(default_factory=list)  # AdaLoRA: [step, sum of ranks] at each change
    kept: list[list] = field(default_factory=list)  # best-k checkpoints: [score, step, file name], best first
    stopped_early: bool = False
    final_epoch_on_train_and_validation: bool = False


@dataclass
class State:
    """A resume state as loaded: tensors by prefixed name, and the JSON part."""

    tensors: dict[str, torch.Tensor]
    meta: dict

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors saved under ``prefix.``, with the prefix removed."""
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


# ---------------------------------------------------------------------------------------- best k

class BestK:
    """The k best checkpoints by a validation metric, over ``LoopState.kept`` (so it is saved with it)."""

    def __init__(self, kept: list[list], k: int, metric: str):
        self.kept, self.k, self.lower_is_better = kept, k, metric == "loss"

    def better(self, a: float, b: float | None) -> bool:
        return b is None or (a < b if self.lower_is_better else a > b)

    def admits(self, score: float) -> bool:
        return len(self.kept) < self.k or self.better(score, self.kept[-1][0])

    def add(self, score: float, step: int, name: str) -> None:
        """Keep ``name``; the worst falls out when there are more than k (its file goes at the next save)."""
        self.kept.append([score, step, name])
        self.kept.sort(key=lambda k: k[0], reverse=not self.lower_is_better)  # stable: ties keep the earlier
        del self.kept[self.k:]

    def best(self) -> str | None:
        return self.kept[0][2] if self.kept else None


def best_file(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step-{step}.safetensors"


def save_best(ckpt_dir: Path, step: int, model, adalora: bool) -> str:
    """Write the trainable weights of ``model`` as a best-k checkpoint; return its file name. AdaLoRA's
    mask lives in lora_E (saved with the weights), its pattern in the PEFT config: keep both."""
    path = best_file(ckpt_dir, step)
    write_safetensors(path, modeling.trainable_state(model, copy=False))
    if adalora:
        write_json(path.with_suffix(".rank_pattern.json"), modeling.rank_pattern(model))
    return path.name


def load_best(ckpt_dir: Path, name: str, model, adalora: bool) -> None:
    """Put a best-k checkpoint's weights (and AdaLoRA rank pattern) back into ``model``."""
    path = Path(ckpt_dir) / name
    modeling.load_trainable_state(model, load_file(path))
    if adalora:
        modeling.set_rank_pattern(model, read_json(path.with_suffix(".rank_pattern.json")))


# ---------------------------------------------------------------------------------- resume state

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


def rng_tensors() -> dict[str, torch.Tensor]:
    """torch's global RNG (and CUDA's): what dropout draws from."""
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def restore_rng(state: State) -> None:
    torch.set_rng_state(state.tensors["rng.torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())])


def save(ckpt_dir: Path, loop: LoopState, model, optimizer, scheduler, data_order: torch.Tensor,
         adalora: bool) -> Path:
    """Write the complete resume state after ``loop.step`` steps and point ``latest.json`` at it.
    ``data_order`` is the data-order generator's state at the start of epoch ``loop.epoch``."""
    tensors = {f"param.{n}": t for n, t in modeling.trainable_state(model, copy=False).items()}
    opt_tensors, opt_meta = optimizer_to_flat(optimizer.state_dict())
    tensors.update({f"optim.{k}": t for k, t in opt_tensors.items()})
    tensors.update(rng_tensors())
    tensors["rng.order"] = data_order
    meta = {"loop": dataclasses.asdict(loop), "optimizer": opt_meta, "scheduler": scheduler.state_dict()}
    if adalora:
        for kind, scores in modeling.allocator_state(model).items():
            tensors.update({f"adalora.{kind}.{n}": t for n, t in scores.items()})
        meta["rank_pattern"] = modeling.rank_pattern(model)
    return write(ckpt_dir, loop.step, tensors, meta, keep={name for _, _, name in loop.kept})


def restore(state: State, model, optimizer, scheduler, adalora: bool, device) -> tuple[LoopState, torch.Tensor]:
    """Load ``state`` into the model, optimizer and scheduler; return the LoopState and the data order.
    The global RNG is restored separately (restore_rng), at the point the loop saved it."""
    meta = state.meta
    modeling.load_trainable_state(model, state.group("param"))
    optimizer.load_state_dict(optimizer_from_flat(state.group("optim"), meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    if adalora:
        modeling.restore_allocator_state(
            model, {kind: state.group(f"adalora.{kind}") for kind in modeling.ALLOCATOR_STATE}, device)
        modeling.set_rank_pattern(model, meta["rank_pattern"])
    return LoopState(**meta["loop"]), state.tensors["rng.order"]


def write(ckpt_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict, keep: set[str] = frozenset()) -> Path:
    """Write one complete state folder, point ``latest.json`` at it, then remove older states and best-k
    files not named in ``keep``; return the state's folder."""
    ckpt_dir = Path(ckpt_dir)
    name = f"state-{step}"
    with atomic_folder(ckpt_dir / name) as tmp:
        write_safetensors(tmp / "tensors.safetensors", {k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        write_json(tmp / "state.json", meta)
    write_json(ckpt_dir / POINTER, {"state": name, "step": step})
    for old in ckpt_dir.glob("state-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    for old in ckpt_dir.glob("step-*.safetensors"):
        if old.name not in keep:
            old.unlink(missing_ok=True)
            old.with_suffix(".rank_pattern.json").unlink(missing_ok=True)
    return ckpt_dir / name


def load(ckpt_dir: Path) -> State | None:
    """The latest complete state, or None when the run never wrote one."""
    pointer = Path(ckpt_dir) / POINTER
    if not pointer.is_file():
        return None
    try:
        folder = Path(ckpt_dir) / json.loads(pointer.read_text())["state"]
        meta = json.loads((folder / "state.json").read_text())
        tensors = load_file(folder / "tensors.safetensors")
        LoopState(**meta["loop"])  # a state from another peftlab version fails here, not halfway through
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
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
