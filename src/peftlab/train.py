"""fit(): the training loop, in one place, on Accelerate.

Accelerate owns devices, mixed precision, gradient accumulation and multiple processes; this file owns
the order of an optimizer step, evaluation, best-checkpoint keeping and early stopping. AdaLoRA's
``update_and_allocate`` is a plain ``if`` below: the transformers Trainer never calls it, which is why
AdaLoRA under the Trainer trains as fixed-rank SVD-LoRA (peft docs, AdaLoraModel.update_and_allocate).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .batching import TrainSet, lengths
from .config import TrainConfig
from .evaluate import metrics, predict_logits
from .modeling import trainable_state
from .runs import METRICS, append_jsonl, read_jsonl, write_json, write_jsonl, write_safetensors

log = logging.getLogger("peftlab")

# Learning rate of the optional extra epoch on train+validation, as a fraction of the peak rate:
# the schedule has decayed to ~0 by then, and a full-rate epoch would undo the selected checkpoint.
FINAL_EPOCH_LR_FRACTION = 0.1


def optimizer_steps(n_train: int, cfg: TrainConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) — AdaLoRA's total_step counts these.
    ``batch_size`` is the global batch: the same whatever the number of processes."""
    batches = math.ceil(n_train / cfg.batch_size)
    per_epoch = math.ceil(batches / cfg.gradient_accumulation_steps)
    total = per_epoch * cfg.epochs
    return per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "accelerator") and torch.accelerator.is_available())


def process_state(cfg: TrainConfig | None = None):
    """Accelerate's process state (rank, number of processes), created once, before any Accelerator;
    with ``cfg``, also checks that its global batch divides among the processes.

    Without a GPU, Accelerate treats processes started by torchrun as one process each unless told that
    CPU processes are meant (``cpu=True``): then it joins them with gloo. ``accelerate launch`` without
    ``--multi_gpu`` runs a single process however many were asked for; that is refused here rather than
    silently training one process's share.
    """
    import os

    from accelerate import PartialState

    from .errors import ConfigError

    distributed_env = ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
    if "ACCELERATE_MIXED_PRECISION" in os.environ and "MASTER_ADDR" in os.environ \
            and not any(k in os.environ for k in distributed_env):
        raise ConfigError("accelerate launch started one process, not the several asked for: add --multi_gpu "
                          "(it starts them through torchrun; without GPUs peftlab joins them with gloo on CPU)")
    state = PartialState(cpu=not _has_accelerator())
    if cfg is not None and cfg.batch_size % state.num_processes:
        raise ConfigError(f"train.batch_size={cfg.batch_size} is the global batch and must divide evenly among "
                          f"{state.num_processes} processes: use a multiple of {state.num_processes}")
    return state


@dataclass
class AdaLoraSchedule:
    """What the loop needs to drive AdaLoRA: the number of completed optimizer steps from which the final
    rank pattern holds. Checkpoints before it are not eligible as 'best': their pattern is not the final
    one, and entries pruned by the last mask may have regrown since, so a reload would change logits."""

    final_step: int

    @classmethod
    def for_schedule(cls, total_steps: int, tfinal: int) -> AdaLoraSchedule:
        # PEFT makes the final allocation in update_and_allocate(t) with t == total_step - tfinal, and the
        # loop calls it with the number of steps completed *before* the current one: the final pattern
        # exists once total_step - tfinal + 1 steps are complete.
        return cls(final_step=total_steps - tfinal + 1)


@dataclass
class FitResult:
    global_step: int = 0
    best: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    train_examples_seen: int = 0
    stopped_early: bool = False
    final_epoch_on_train_and_validation: bool = False
    rank_history: list[list[int]] = field(default_factory=list)  # AdaLoRA: [step, sum of ranks] at each change


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator, DataLoaderConfiguration

    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    elif precision == "fp32":
        precision = "no"
    if precision == "fp16" and not torch.cuda.is_available():
        from .errors import ConfigError

        raise ConfigError("train.precision=fp16 needs a GPU; use fp32 or bf16 on CPU")
    process_state(cfg)
    # split_batches: the loader yields global batches and each process takes its slice, so a step sees the
    # same examples as one process would: results do not depend on the number of processes.
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                       cpu=not _has_accelerator(), dataloader_config=DataLoaderConfiguration(split_batches=True))


class _KeepMask(torch.autograd.Function):
    """x * keep / (1 - p) with keep ~ Bernoulli(1 - p) drawn as rand >= p; saves the boolean mask only."""

    @staticmethod
    def forward(ctx, x, p: float):
        keep = torch.rand_like(x) >= p
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None


class FastDropout(torch.nn.Dropout):
    """nn.Dropout with the mask drawn by torch.rand: on CPU, bernoulli_ took 15 % of a LoRA training step
    of MiniLM at batch 16 (profile), twice the time of rand. Each element is kept with probability 1 - p
    and scaled by 1 / (1 - p), as in nn.Dropout; only the random stream differs."""

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        return _KeepMask.apply(x, self.p)


@contextlib.contextmanager
def fast_dropout(model, enabled: bool = True):
    """Swap every nn.Dropout in ``model`` for FastDropout, and back on exit (exports, serving and reloads
    see the model's own modules). Attention dropout inside SDPA is the kernel's and stays as it is."""
    swapped = []
    if enabled:
        for parent in model.modules():
            for name, child in parent.named_children():
                if type(child) is torch.nn.Dropout and child.p > 0:
                    setattr(parent, name, FastDropout(child.p, child.inplace))
                    swapped.append((parent, name, child))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def _param_groups(model, lr: float, head_lr: float, weight_decay: float, head_modules: list[str]):
    """AdamW groups: no decay on biases and norms (BERT's recipe); the head may get its own rate."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = any(h in name for h in head_modules) or "modules_to_save" in name
        no_decay = p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name
        groups.setdefault((is_head, no_decay), []).append(p)
    return [{"params": ps, "lr": head_lr if is_head else lr, "weight_decay": 0.0 if nd else weight_decay}
            for (is_head, nd), ps in groups.items()]


def _predict_sharded(accelerator, model, ids: list[list[int]], pad_id: int, batch_size: int):
    """Logits of all ``ids`` on every process, each process computing an interleaved share."""
    if accelerator.num_processes == 1:
        return predict_logits(model, ids, pad_id, batch_size, accelerator.device)
    import numpy as np
    from accelerate.utils import gather_object

    # Interleaved over lengths, so every share has the same mix of short and long texts.
    order = sorted(range(len(ids)), key=lengths(ids).__getitem__)[accelerator.process_index::accelerator.num_processes]
    part = predict_logits(model, [ids[i] for i in order], pad_id, batch_size, accelerator.device)
    out = np.zeros((len(ids), part.shape[1]), dtype=part.dtype)
    for idx, logits in gather_object([(order, part)]):
        out[idx] = logits
    return out


def _better(metric: str, a: float, b: float | None) -> bool:
    return b is None or (a < b if metric == "loss" else a > b)


def fit(model, train_set: TrainSet, val_ids: list[list[int]], val_labels: list[int], cfg: TrainConfig,
        lr: float, run_dir: Path, head_modules: list[str], adalora: AdaLoraSchedule | None = None,
        extra_set: TrainSet | None = None, on_eval: Callable[[dict], None] | None = None,
        resume: checkpoint.State | None = None) -> FitResult:
    """Train ``model`` in place; on return it holds the best checkpoint's weights (or the final ones).

    With ``resume`` (checkpoint.load of this run's folder), continue from that state: weights, optimizer,
    scheduler, AdaLoRA importance scores and rank pattern, RNG, data order and loop counters are restored,
    so the run ends exactly as it would have without the interruption.
    """
    with fast_dropout(model, cfg.fast_dropout):
        return _fit(model, train_set, val_ids, val_labels, cfg, lr, run_dir, head_modules, adalora, extra_set,
                    on_eval, resume)


def _fit(model, train_set: TrainSet, val_ids, val_labels: list[int], cfg: TrainConfig, lr: float, run_dir: Path,
         head_modules: list[str], adalora: AdaLoraSchedule | None, extra_set: TrainSet | None,
         on_eval: Callable[[dict], None] | None, resume: checkpoint.State | None) -> FitResult:
    from accelerate.utils import set_seed
    from safetensors.torch import load_file
    from tqdm.auto import tqdm
    from transformers import get_scheduler
    from transformers.trainer_pt_utils import LengthGroupedSampler

    accelerator = _accelerator(cfg)
    set_seed(cfg.seed)
    sampler = LengthGroupedSampler(cfg.batch_size, lengths=lengths(train_set.input_ids),
                                   generator=torch.Generator().manual_seed(cfg.seed))
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                                         collate_fn=train_set.collate)
    per_epoch, total_steps = optimizer_steps(len(train_set), cfg)
    # On CUDA, the fused AdamW kernel: one launch per step instead of several per parameter (same update).
    optimizer = torch.optim.AdamW(_param_groups(model, lr, cfg.head_learning_rate or lr, cfg.weight_decay,
                                                head_modules), lr=lr, fused=accelerator.device.type == "cuda")
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    # With split batches, Accelerate's scheduler wrapper steps once per optimizer step, whatever the processes.
    plain = accelerator.unwrap_model(model)
    ckpt_dir = Path(run_dir) / "checkpoints"
    kept: list[tuple[float, int, Path]] = []  # (metric, step, file) of the best-k checkpoints
    result = FitResult()
    pad_id = train_set.pad_id
    metrics_file = Path(run_dir) / METRICS
    evals_without_gain = 0
    running_loss, running_n = 0.0, 0
    eval_every = cfg.eval_every_steps or per_epoch
    start = time.perf_counter()
    epoch_start_order = sampler.generator.get_state()  # data order of the current epoch, for resuming

    def rank_budget() -> int:
        # Kept singular values over all modules. PEFT has no rank pattern before its first allocation:
        # every module still has init_r, which is the allocator's init_bgt.
        pattern = plain.peft_config["default"].rank_pattern
        return sum(map(sum, pattern.values())) if pattern else plain.base_model.rankallocator.init_bgt

    if adalora is not None:
        result.rank_history.append([0, rank_budget()])

    def evaluate_now(epoch: float) -> bool:
        """Validate, log, keep the checkpoint if among the best; return True to stop early."""
        nonlocal running_loss, running_n, evals_without_gain
        logits = _predict_sharded(accelerator, plain, val_ids, pad_id, cfg.eval_batch_size)
        m = metrics(logits, val_labels)
        train_loss = running_loss / max(running_n, 1)
        if accelerator.num_processes > 1:  # each process saw its slice of every batch
            train_loss = accelerator.reduce(torch.tensor(train_loss, device=accelerator.device), "mean").item()
        record = {"step": result.global_step, "epoch": round(epoch, 3),
                  "train_loss": train_loss, "eval_loss": m["loss"],
                  "eval_accuracy": m["accuracy"], "eval_f1": m["f1"], "learning_rate": scheduler.get_last_lr()[0],
                  "elapsed_seconds": round(time.perf_counter() - start, 2)}
        running_loss, running_n = 0.0, 0
        result.history.append(record)
        if accelerator.is_main_process:
            append_jsonl(metrics_file, record)
        if on_eval:
            on_eval(record)
        score = {"accuracy": m["accuracy"], "f1": m["f1"], "loss": m["loss"]}[cfg.metric_for_best]
        eligible = adalora is None or result.global_step >= adalora.final_step
        if not eligible:
            return False
        best_score = result.best.get("score")
        if _better(cfg.metric_for_best, score, best_score):
            result.best = {**record, "score": score}
            evals_without_gain = 0
        else:
            evals_without_gain += 1
        worst = kept[-1][0] if len(kept) >= cfg.save_top_k else None
        if worst is None or _better(cfg.metric_for_best, score, worst):
            path = ckpt_dir / f"step-{result.global_step}.safetensors"
            if accelerator.is_main_process:
                write_safetensors(path, trainable_state(plain, copy=False))
                if adalora is not None:  # the mask lives in lora_E, the pattern in the config: keep both
                    write_json(path.with_suffix(".rank_pattern.json"), plain.peft_config["default"].rank_pattern)
            kept.append((score, result.global_step, path))
            kept.sort(key=lambda k: k[0], reverse=cfg.metric_for_best != "loss")
            # Files that fall out of the best-k are deleted by save_state, once no saved state names them.
            del kept[cfg.save_top_k:]
        return bool(cfg.early_stopping_patience) and evals_without_gain >= cfg.early_stopping_patience

    def save_state(epoch: int, batches_done: int) -> None:
        """Everything needed to continue after ``batches_done`` batches of ``epoch`` (see checkpoint.py)."""
        if not accelerator.is_main_process:
            return
        tensors = {f"param.{n}": t for n, t in trainable_state(plain, copy=False).items()}
        opt_tensors, opt_meta = checkpoint.optimizer_to_flat(optimizer.state_dict())
        tensors.update({f"optim.{k}": t for k, t in opt_tensors.items()})
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        tensors["rng.order"] = epoch_start_order
        meta = {"step": result.global_step, "epoch": epoch, "batches_done": batches_done,
                "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
                "train_seconds": time.perf_counter() - start, "train_examples_seen": result.train_examples_seen,
                "running_loss": running_loss, "running_n": running_n, "evals_without_gain": evals_without_gain,
                "best": result.best, "history": result.history, "rank_history": result.rank_history,
                "kept": [[score, step, path.name] for score, step, path in kept]}
        if adalora is not None:
            allocator = plain.base_model.rankallocator
            for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                tensors.update({f"adalora.{kind}.{n}": t for n, t in getattr(allocator, kind).items()})
            meta["rank_pattern"] = plain.peft_config["default"].rank_pattern
        checkpoint.save(ckpt_dir, result.global_step, tensors, meta)
        names = {path.name for _, _, path in kept}
        for old in ckpt_dir.glob("step-*.safetensors"):
            if old.name not in names:
                old.unlink(missing_ok=True)
                old.with_suffix(".rank_pattern.json").unlink(missing_ok=True)

    def restore_state(state: checkpoint.State) -> tuple[int, int]:
        """Load ``state`` into the model, optimizer, scheduler and loop; return (epoch, batches done)."""
        nonlocal running_loss, running_n, evals_without_gain, start
        meta = state.meta
        params = dict(plain.named_parameters())
        with torch.no_grad():
            for n, t in state.group("param").items():
                params[n].copy_(t.to(params[n].device))
        optimizer.load_state_dict(checkpoint.optimizer_from_flat(state.group("optim"), meta["optimizer"]))
        scheduler.load_state_dict(meta["scheduler"])
        if adalora is not None:
            allocator = plain.base_model.rankallocator
            for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                getattr(allocator, kind).clear()
                getattr(allocator, kind).update({n: t.to(accelerator.device) for n, t in state.group(f"adalora.{kind}").items()})
            plain.peft_config["default"].rank_pattern = meta["rank_pattern"]
        result.global_step = meta["step"]
        result.train_examples_seen = meta["train_examples_seen"]
        result.best, result.history, result.rank_history = meta["best"], meta["history"], meta["rank_history"]
        running_loss, running_n, evals_without_gain = meta["running_loss"], meta["running_n"], meta["evals_without_gain"]
        kept[:] = [(score, step, ckpt_dir / name) for score, step, name in meta["kept"]]
        start = time.perf_counter() - meta["train_seconds"]
        sampler.generator.set_state(state.tensors["rng.order"])
        if accelerator.is_main_process:  # evaluations after the state are replayed: drop their lines
            write_jsonl(metrics_file, [r for r in read_jsonl(metrics_file) if r["step"] <= result.global_step])
        return meta["epoch"], meta["batches_done"]

    def restore_rng(state: checkpoint.State) -> None:
        torch.set_rng_state(state.tensors["rng.torch"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all([state.tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())])

    def train_epoch(batches, desc: str, epoch_index: int, schedule: bool, skip: int = 0,
                    on_first_batch: Callable[[], None] | None = None) -> bool:
        """One pass over ``batches`` (the first ``skip`` already done); return True when training must stop."""
        nonlocal running_loss, running_n
        model.train()
        n_batches = len(batches)
        if skip:
            batches = accelerator.skip_first_batches(batches, skip)
        bar = tqdm(batches, desc=desc, disable=not accelerator.is_local_main_process, leave=False, dynamic_ncols=True,
                   initial=skip, total=n_batches)
        for i, batch in enumerate(bar, start=skip):
            if on_first_batch is not None:
                # The data loader's iterator draws its base seed from torch's global RNG when it starts:
                # restore the RNG after that draw, as it stood at this point in the interrupted run.
                on_first_batch()
                on_first_batch = None
            if schedule and result.global_step >= total_steps:
                return True  # a resumed run whose state was saved at the last step
            with accelerator.accumulate(model):
                # Loss through the model: AdaLoRA adds its orthogonal regulariser to outputs.loss.
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                if schedule:
                    scheduler.step()
                if accelerator.sync_gradients:
                    if adalora is not None:
                        # Importance update and rank allocation need this step's gradients: after
                        # optimizer.step(), before zero_grad() (peft AdaLoraModel.update_and_allocate).
                        plain.base_model.update_and_allocate(result.global_step)
                    result.global_step += 1
                    if adalora is not None and (budget := rank_budget()) != result.rank_history[-1][1]:
                        result.rank_history.append([result.global_step, budget])  # only changes: stays small
                optimizer.zero_grad(set_to_none=True)
            running_loss += loss.detach().float().item()
            running_n += 1
            result.train_examples_seen += batch["input_ids"].shape[0] * accelerator.num_processes
            bar.set_postfix(loss=f"{running_loss / running_n:.4f}", refresh=False)
            if not accelerator.sync_gradients:
                continue
            due = schedule and cfg.eval_every_steps and result.global_step % eval_every == 0
            if due and evaluate_now(epoch_index + (i + 1) / n_batches):
                return True
            if schedule and (due or (cfg.checkpoint_every_steps and result.global_step % cfg.checkpoint_every_steps == 0)):
                save_state(epoch_index, i + 1)
            if result.global_step >= total_steps and schedule:
                return True
        return False

    first_epoch, skip, first_batch_hook = 0, 0, None
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.clean_partial(ckpt_dir)
    if resume is not None:
        first_epoch, skip = restore_state(resume)
        first_batch_hook = lambda: restore_rng(resume)  # noqa: E731
        log.info("resuming at optimizer step %d (epoch %d, batch %d)", result.global_step, first_epoch + 1, skip)
    stop = False
    for epoch in range(first_epoch, cfg.epochs):
        epoch_start_order = sampler.generator.get_state()  # after a restore: the interrupted epoch's
        stop = train_epoch(loader, f"epoch {epoch + 1}/{cfg.epochs}", epoch, schedule=True, skip=skip,
                           on_first_batch=first_batch_hook)
        if first_batch_hook is not None and skip >= len(loader):
            restore_rng(resume)  # the state was saved after the epoch's last batch: nothing was fetched
        skip, first_batch_hook = 0, None
        last_eval_step = result.history[-1]["step"] if result.history else -1
        ending = stop or epoch == cfg.epochs - 1
        if not cfg.eval_every_steps or (ending and last_eval_step != result.global_step):
            stop = evaluate_now(epoch + 1) or stop
            if not stop and not ending:
                save_state(epoch + 1, 0)
        if stop:
            result.stopped_early = result.global_step < total_steps
            break
    result.train_seconds = time.perf_counter() - start

    # Restore the best checkpoint (on every process, from the main process's file).
    accelerator.wait_for_everyone()
    if kept:
        best_file = max(kept, key=lambda k: k[0]) if cfg.metric_for_best != "loss" else min(kept, key=lambda k: k[0])
        state = load_file(best_file[2])
        params = dict(plain.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t.to(params[n].device))
        if adalora is not None:
            plain.peft_config["default"].rank_pattern = json.loads(best_file[2].with_suffix(".rank_pattern.json").read_text())

    if extra_set is not None:
        # seed 003: one more epoch on train+validation at a small constant rate, then keep the result.
        for g in optimizer.param_groups:
            g["lr"] = lr * FINAL_EPOCH_LR_FRACTION
        extra_loader = accelerator.prepare(torch.utils.data.DataLoader(
            extra_set, batch_size=cfg.batch_size, sampler=LengthGroupedSampler(
                cfg.batch_size, lengths=lengths(extra_set.input_ids),
                generator=torch.Generator().manual_seed(cfg.seed + 1)), collate_fn=extra_set.collate))
        t0 = time.perf_counter()
        train_epoch(extra_loader, "final epoch on train+validation", cfg.epochs, schedule=False)
        result.train_seconds += time.perf_counter() - t0
        result.final_epoch_on_train_and_validation = True
    if result.rank_history and result.rank_history[-1][0] != result.global_step:
        result.rank_history.append([result.global_step, result.rank_history[-1][1]])  # the series spans the run
    model.eval()
    return result
