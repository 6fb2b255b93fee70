"""fit(): the training loop, in one place, on Accelerate.

Accelerate owns devices, mixed precision, gradient accumulation and multiple processes; this file owns the
order of an optimizer step, when to evaluate and when to save, best-checkpoint keeping and early stopping.
AdaLoRA's rank allocation is a plain ``if`` in the optimizer step: the transformers Trainer never calls
it, which is why AdaLoRA under the Trainer trains as fixed-rank SVD-LoRA (peft docs,
AdaLoraModel.update_and_allocate).

Everything the loop changes besides the model, optimizer and scheduler lives in one LoopState
(checkpoint.py), which the resume state saves and restores whole.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.trainer_pt_utils import LengthGroupedSampler

from . import checkpoint, modeling
from .checkpoint import BestK, LoopState
from .config import TrainConfig
from .dropout import fast_dropout
from .errors import ConfigError
from .files import append_jsonl, read_jsonl, write_jsonl
from .metrics import metrics
from .predictor import predict_logits
from .rundir import CHECKPOINTS, METRICS
from .tokens import Examples, lengths

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


def adalora_final_step(total_steps: int, tfinal: int) -> int:
    """Completed optimizer steps from which AdaLoRA's final rank pattern holds. PEFT makes the final
    allocation in update_and_allocate(t) with t == total_step - tfinal, called with the number of steps
    completed *before* the current one. Earlier checkpoints cannot be 'best': their pattern is not the
    final one, and entries pruned by the last mask may have regrown since, so a reload would change logits."""
    return total_steps - tfinal + 1


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


def make_accelerator(cfg: TrainConfig):
    precision = {"fp32": "no", "auto": "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
                 else "no"}.get(cfg.precision, cfg.precision)
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a GPU; use fp32 or bf16 on CPU")
    process_state(cfg)
    # split_batches: the loader yields global batches and each process takes its slice, so a step sees the
    # same examples as one process would: results do not depend on the number of processes.
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                       cpu=not _has_accelerator(), dataloader_config=DataLoaderConfiguration(split_batches=True))


def param_groups(model, lr: float, head_lr: float, weight_decay: float, head_modules: list[str]):
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


def length_grouped_loader(examples: Examples, batch_size: int, seed: int):
    """Batches of similar lengths in random order (transformers' LengthGroupedSampler, its own generator)."""
    sampler = LengthGroupedSampler(batch_size, lengths=lengths(examples.input_ids),
                                   generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(examples, batch_size=batch_size, sampler=sampler, collate_fn=examples.collate)


def optimizer_step(model, batch, optimizer, scheduler, accelerator, max_grad_norm: float, adalora=None,
                   step: int = 0) -> float:
    """Forward, backward, clip, step, schedule, allocate, zero: one batch, in this order; returns its loss.
    With gradient accumulation the optimizer only steps when Accelerate syncs the gradients. ``adalora``:
    the unwrapped AdaLoRA model, whose ranks are allocated for optimizer step ``step`` (0-based)."""
    with accelerator.accumulate(model):
        loss = model(**batch).loss  # through the model: AdaLoRA adds its orthogonal regulariser to outputs.loss
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if accelerator.sync_gradients and adalora is not None:
            modeling.adalora_allocate(adalora, step)  # needs this step's gradients: before zero_grad
        optimizer.zero_grad(set_to_none=True)
    return loss.detach().float().item()


def validation_logits(accelerator, model, examples: Examples, batch_size: int) -> np.ndarray:
    """Logits of the validation set on every process, each process computing an interleaved share."""
    ids = examples.input_ids
    if accelerator.num_processes == 1:
        return predict_logits(model, ids, examples.pad_id, batch_size, accelerator.device)
    # Interleaved over lengths, so every share has the same mix of short and long texts.
    order = sorted(range(len(ids)), key=lengths(ids).__getitem__)[accelerator.process_index::accelerator.num_processes]
    part = predict_logits(model, [ids[i] for i in order], examples.pad_id, batch_size, accelerator.device)
    out = np.zeros((len(ids), part.shape[1]), dtype=part.dtype)
    for idx, logits in gather_object([(order, part)]):
        out[idx] = logits
    return out


def fit(model, train: Examples, validation: Examples, cfg: TrainConfig, run_dir: Path, *, learning_rate: float,
        head_modules: list[str], adalora_final: int | None = None, extra: Examples | None = None,
        on_eval: Callable[[dict], None] | None = None, resume: checkpoint.State | None = None) -> LoopState:
    """Train ``model`` in place; on return it holds the best checkpoint's weights (or the final ones).

    ``adalora_final``: AdaLoRA's adalora_final_step (None for other methods). ``extra``: train+validation,
    for one more epoch at a small rate after training. With ``resume`` (checkpoint.load of this run's
    folder), continue from that state: weights, optimizer, scheduler, AdaLoRA importance scores and rank
    pattern, RNG, data order and loop counters are restored, so the run ends exactly as it would have
    without the interruption.
    """
    with fast_dropout(model, cfg.fast_dropout):
        accelerator = make_accelerator(cfg)
        set_seed(cfg.seed)
        loader = length_grouped_loader(train, cfg.batch_size, cfg.seed)
        order = loader.sampler.generator  # the data order's own generator: saved with every state
        total_steps = optimizer_steps(len(train), cfg)[1]
        # On CUDA, the fused AdamW kernel: one launch per step instead of several per parameter (same update).
        optimizer = torch.optim.AdamW(param_groups(model, learning_rate, cfg.head_learning_rate or learning_rate,
                                                   cfg.weight_decay, head_modules),
                                      lr=learning_rate, fused=accelerator.device.type == "cuda")
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                                  num_training_steps=total_steps)
        # With split batches, Accelerate's scheduler wrapper steps once per optimizer step, whatever the processes.
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
        plain = accelerator.unwrap_model(model)
        is_adalora, main = adalora_final is not None, accelerator.is_main_process
        ckpt_dir, metrics_file = Path(run_dir) / CHECKPOINTS, Path(run_dir) / METRICS
        if main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.clean_partial(ckpt_dir)

        state = LoopState(rank_history=[[0, modeling.adalora_rank_budget(plain)]] if is_adalora else [])
        order_at_epoch_start = order.get_state()
        if resume is not None:
            state, order_at_epoch_start = checkpoint.restore(resume, plain, optimizer, scheduler, is_adalora,
                                                             accelerator.device)
            order.set_state(order_at_epoch_start)
            if main:  # evaluations after the state are replayed: drop their lines
                write_jsonl(metrics_file, [r for r in read_jsonl(metrics_file) if r["step"] <= state.step])
            log.info("resuming at optimizer step %d (epoch %d, batch %d)", state.step, state.epoch + 1,
                     state.batches_done)
        rng_pending = resume  # the global RNG is restored where the interrupted run saved it (below)
        best_k = BestK(state.kept, cfg.save_top_k, cfg.metric_for_best)
        started = time.perf_counter() - state.train_seconds
        n_batches = len(loader)

        while state.epoch < cfg.epochs and state.step < total_steps and not state.stopped_early:
            if rng_pending is not None and state.batches_done == 0:
                # Saved at an epoch boundary, before the next epoch's loader drew its worker seed from the
                # global RNG: restore it before this loader starts, so it draws the same seed.
                checkpoint.restore_rng(rng_pending)
                rng_pending = None
            model.train()
            batches = accelerator.skip_first_batches(loader, state.batches_done) if state.batches_done else loader
            bar = tqdm(batches, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", initial=state.batches_done,
                       total=n_batches, disable=not accelerator.is_local_main_process, leave=False, dynamic_ncols=True)
            for batch in bar:
                if rng_pending is not None:
                    # Saved mid-epoch, after this epoch's loader had drawn its seed: restore it after the
                    # resumed loader's own draw, at the batch where the interrupted run stood.
                    checkpoint.restore_rng(rng_pending)
                    rng_pending = None
                loss = optimizer_step(model, batch, optimizer, scheduler, accelerator, cfg.max_grad_norm,
                                      plain if is_adalora else None, state.step)
                state.running_loss += loss
                state.running_n += 1
                state.batches_done += 1
                state.examples_seen += batch["input_ids"].shape[0] * accelerator.num_processes
                bar.set_postfix(loss=f"{state.running_loss / state.running_n:.4f}", refresh=False)
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                note_rank_budget(state, plain, is_adalora)

                # What this step calls for: an evaluation, a resume state, the end of the epoch or of training.
                end_of_epoch = state.batches_done == n_batches
                end_of_training = state.step >= total_steps or (end_of_epoch and state.epoch == cfg.epochs - 1)
                every_n = bool(cfg.eval_every_steps) and state.step % cfg.eval_every_steps == 0
                per_epoch_eval = end_of_epoch and not cfg.eval_every_steps
                if every_n or per_epoch_eval or end_of_training:
                    epoch = round(state.epoch + state.batches_done / n_batches, 3) if every_n else state.epoch + 1
                    record = validate(accelerator, plain, validation, cfg, state, scheduler, started, epoch)
                    if main:
                        append_jsonl(metrics_file, record)
                    if on_eval:
                        on_eval(record)
                    if adalora_final is None or state.step >= adalora_final:
                        keep_if_best(record, state, best_k, cfg, ckpt_dir, plain, is_adalora, main)
                    state.stopped_early = bool(cfg.early_stopping_patience) and \
                        state.evals_without_gain >= cfg.early_stopping_patience and state.step < total_steps
                if end_of_epoch:
                    state.epoch, state.batches_done = state.epoch + 1, 0
                    order_at_epoch_start = order.get_state()  # the next epoch's order starts from here
                checkpoint_due = bool(cfg.checkpoint_every_steps) and state.step % cfg.checkpoint_every_steps == 0
                if main and not state.stopped_early and (
                        every_n or checkpoint_due or (per_epoch_eval and not end_of_training)):
                    state.train_seconds = time.perf_counter() - started
                    checkpoint.save(ckpt_dir, state, plain, optimizer, scheduler, order_at_epoch_start, is_adalora)
                if end_of_training or state.stopped_early:
                    break
        if rng_pending is not None:  # the state was saved on the last step: nothing was trained since
            checkpoint.restore_rng(rng_pending)
        state.train_seconds = time.perf_counter() - started

        accelerator.wait_for_everyone()  # the best checkpoint, on every process, from the main process's file
        if best_k.best() is not None:
            checkpoint.load_best(ckpt_dir, best_k.best(), plain, is_adalora)
        if extra is not None:
            final_epoch(model, plain, extra, optimizer, accelerator, cfg, learning_rate, state, is_adalora)
        if state.rank_history and state.rank_history[-1][0] != state.step:
            state.rank_history.append([state.step, state.rank_history[-1][1]])  # the series spans the run
        model.eval()
        return state


def note_rank_budget(state: LoopState, model, is_adalora: bool) -> None:
    """AdaLoRA: record the sum of ranks after a step when it changed (only changes: the series stays small)."""
    if is_adalora and (budget := modeling.adalora_rank_budget(model)) != state.rank_history[-1][1]:
        state.rank_history.append([state.step, budget])


def validate(accelerator, model, validation: Examples, cfg: TrainConfig, state: LoopState, scheduler,
             started: float, epoch: float) -> dict:
    """Evaluate on the validation set; return the metrics.jsonl record and reset the running loss."""
    m = metrics(validation_logits(accelerator, model, validation, cfg.eval_batch_size), validation.labels)
    train_loss = state.running_loss / max(state.running_n, 1)
    if accelerator.num_processes > 1:  # each process saw its slice of every batch
        train_loss = accelerator.reduce(torch.tensor(train_loss, device=accelerator.device), "mean").item()
    record = {"step": state.step, "epoch": epoch, "train_loss": train_loss, "eval_loss": m["loss"],
              "eval_accuracy": m["accuracy"], "eval_f1": m["f1"], "learning_rate": scheduler.get_last_lr()[0],
              "elapsed_seconds": round(time.perf_counter() - started, 2)}
    state.running_loss, state.running_n = 0.0, 0
    state.history.append(record)
    return record


def keep_if_best(record: dict, state: LoopState, best_k: BestK, cfg: TrainConfig, ckpt_dir: Path, model,
                 is_adalora: bool, main: bool) -> None:
    """Early-stopping count and best record; the weights as a best-k checkpoint if they rank among the k."""
    score = {"accuracy": record["eval_accuracy"], "f1": record["eval_f1"], "loss": record["eval_loss"]}[
        cfg.metric_for_best]
    if best_k.better(score, state.best.get("score")):
        state.best = {**record, "score": score}
        state.evals_without_gain = 0
    else:
        state.evals_without_gain += 1
    if best_k.admits(score):
        name = checkpoint.best_file(ckpt_dir, state.step).name
        if main:
            checkpoint.save_best(ckpt_dir, state.step, model, is_adalora)
        best_k.add(score, state.step, name)  # files that fall out go when the next state is saved


def final_epoch(model, plain, extra: Examples, optimizer, accelerator, cfg: TrainConfig, learning_rate: float,
                state: LoopState, is_adalora: bool) -> None:
    """One more epoch on train+validation at a small constant rate, after the best checkpoint is restored
    (the extra epoch of "kms LoRA", NYU ECE-GY 7123 project report); its weights are the ones kept."""
    for g in optimizer.param_groups:
        g["lr"] = learning_rate * FINAL_EPOCH_LR_FRACTION
    loader = accelerator.prepare(length_grouped_loader(extra, cfg.batch_size, cfg.seed + 1))
    started = time.perf_counter()
    model.train()
    for batch in tqdm(loader, desc="final epoch on train+validation", disable=not accelerator.is_local_main_process,
                      leave=False, dynamic_ncols=True):
        optimizer_step(model, batch, optimizer, None, accelerator, cfg.max_grad_norm, plain if is_adalora else None,
                       state.step)
        state.examples_seen += batch["input_ids"].shape[0] * accelerator.num_processes
        if accelerator.sync_gradients:
            state.step += 1
            note_rank_budget(state, plain, is_adalora)
    state.train_seconds += time.perf_counter() - started
    state.final_epoch_on_train_and_validation = True
