"""Workflows: compose the stages. These functions are the Python API (``peftlab.train`` …); the CLI only
translates to them.

    import peftlab
    run = peftlab.train(peftlab.config.load("configs/banking77-lora.yaml"))
    peftlab.evaluate(run)
"""

from __future__ import annotations

import logging
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, set_seed

from . import confidence, modeling, rundir, tracking
from .config import EVAL_BATCH_SIZE, Config, check_adalora_schedule
from .data import load as load_data
from .data import read_labelled
from .errors import DataError, PeftlabError
from .files import read_jsonl, write_json
from .labels import LabelMap
from .loop import adalora_final_step, fit, optimizer_steps, process_state
from .metrics import metrics
from .predictor import Predictor, predict_logits
from .predictor import load as load_predictor
from .report import write_report
from .tokens import Examples, encode

log = logging.getLogger("peftlab")


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(cfg: Config, resume: bool | None = None) -> Path:
    """Train, evaluate on test, and write a complete run folder; return its path.

    An unfinished run of the same ``run_name`` that saved a resume state is continued when ``resume`` is
    None (if its config matches) or True; ``resume=False`` discards it and starts over.
    """
    wall_start = time.perf_counter()
    tracking.check(cfg.train.report_to)  # a missing tracker library fails before any work
    modeling.check_backbone(cfg.model)  # so does a model folder peftlab will not load
    procs = process_state(cfg.train)  # and a launch that would not train as asked
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    # Data first: AdaLoRA's total_step depends on the number of training examples.
    splits = load_data(cfg.data, cfg.train.seed)
    for note in splits.notes:
        log.warning(note)
    total_steps = optimizer_steps(len(splits.train), cfg.train)[1]
    schedule = check_adalora_schedule(cfg.adapter, total_steps) if cfg.adapter.method == "adalora" else None
    state = rundir.resume_state(cfg, resume)
    run_dir = _run_folder(cfg, splits.name, state is not None, procs)
    set_seed(cfg.train.seed)
    model, tokenizer, details = modeling.build(cfg.model, cfg.adapter, splits.labels.id2label, total_steps, schedule)
    resolved = rundir.resolved_config(cfg, schedule)
    initial_adapter = None
    if procs.is_main_process:
        record = {"versions": rundir.versions(), **details, "dataset": splits.name, "notes": splits.notes,
                  "data_files": splits.files}
        rundir.write_config(run_dir, resolved, record)
        splits.labels.save(run_dir / rundir.LABELS)
        if cfg.adapter.method != "full" and cfg.adapter.init_lora_weights in ("pissa", "olora"):
            initial_adapter = run_dir / "initial_adapter"
            modeling.save_initial_adapter(model, initial_adapter)
    trainable, total = modeling.count_parameters(model)
    log.info("%s on %s: trainable %s", cfg.adapter.method, splits.name, modeling.format_parameters(trainable, total))

    max_len, pad_id = cfg.model.max_length_tokens, tokenizer.pad_token_id or 0
    train_set = Examples(encode(splits.train.text, tokenizer, max_len), splits.labels.encode(splits.train.label), pad_id)
    validation = Examples(encode(splits.validation.text, tokenizer, max_len),
                          splits.labels.encode(splits.validation.label), pad_id)
    extra = None
    if cfg.train.final_epoch_on_train_and_validation:
        extra = Examples(train_set.input_ids + validation.input_ids, train_set.labels + validation.labels, pad_id)
    # Trackers see what metrics.jsonl gets (fit's on_eval), then the test metrics; closed as failed
    # if anything below raises.
    with tracking.start(cfg.train, run_dir, resolved, enabled=procs.is_main_process) as tracker:
        result = fit(model, train_set, validation, cfg.train, run_dir, learning_rate=cfg.learning_rate,
                     head_modules=[m.rsplit(".", 1)[-1] for m in details["newly_initialised"]],
                     adalora_final=adalora_final_step(total_steps, schedule[1]) if schedule else None,
                     extra=extra, on_eval=tracker.log_eval, resume=state)
        if procs.is_main_process:
            with modeling.merged_for_inference(model):
                outputs = _inference(model, cfg, splits, train_set, validation, tokenizer)
            eval_seconds = outputs.pop("seconds")
            test_ids, logits = outputs["test_ids"], outputs["test"].logits
            test = metrics(logits, splits.labels.encode(splits.test.label), splits.labels.names, per_class=True)
            summary = {
                "method": cfg.adapter.method, "dataset": splits.name, "notes": splits.notes,
                "backbone": details["backbone"], "splits": splits.sizes(), "num_labels": len(splits.labels),
                "trainable_parameters": trainable, "total_parameters": total,
                "trainable_percent": 100 * trainable / total, "parameters": modeling.format_parameters(trainable, total),
                "optimizer_steps": result.step, "planned_optimizer_steps": total_steps,
                "best_step": result.best.get("step"), "best_epoch": result.best.get("epoch"),
                "best_validation": {k: result.best.get(f"eval_{k}") for k in ("accuracy", "f1", "loss")},
                "stopped_early": result.stopped_early,
                "final_epoch_on_train_and_validation": result.final_epoch_on_train_and_validation,
                "test_accuracy": test["accuracy"], "test_f1": test["f1"], "test_loss": test["loss"],
                "train_seconds": round(result.train_seconds, 2),
                "wall_seconds": round(time.perf_counter() - wall_start, 2),
                "train_samples_per_second": round(result.examples_seen / max(result.train_seconds, 1e-9), 2),
                "eval_samples_per_second": round(len(test_ids) / max(eval_seconds, 1e-9), 2),
                "peak_memory_mb": round(peak_memory_mb(), 1),
                "device": str(next(model.parameters()).device), "num_processes": procs.num_processes,
                "label_counts": splits.label_counts(),
            }
            if schedule:
                summary["adalora"] = _adalora_summary(model, cfg, schedule, total_steps, result.rank_history)
            modeling.save_model(model, tokenizer, run_dir / (rundir.MODEL if cfg.adapter.method == "full"
                                                             else rundir.ADAPTER), initial_adapter)
            conf, conf_summary = confidence.fit(
                cfg.ood, outputs["validation"], outputs.get("validation_oos"), outputs["test"],
                outputs.get("test_oos"), outputs.get("train"),
                splits.labels.ids.get(cfg.data.oos_label) if cfg.data.oos_train == "class" else None)
            summary.update(conf_summary)
            if result.final_epoch_on_train_and_validation and (cfg.ood.calibrate or cfg.ood.method != "none"):
                note = ("the temperature and the out-of-scope threshold were fitted on validation texts that the "
                        "final epoch trained on: scores may be overconfident")
                log.warning(note)
                summary["notes"] = [*summary["notes"], note]
            conf.save(run_dir)
            write_json(run_dir / rundir.TEST_METRICS, test)
            write_report(run_dir, summary, read_jsonl(run_dir / rundir.METRICS))
            shutil.rmtree(run_dir / rundir.CHECKPOINTS, ignore_errors=True)
            tracker.log_final(summary, result.step)
            write_json(run_dir / rundir.SUMMARY, summary)  # last: marks the run complete
    procs.wait_for_everyone()  # the other processes return once the run folder is complete
    return run_dir


def _inference(model, cfg: Config, splits, train_set: Examples, validation: Examples, tokenizer) -> dict:
    """After training: test logits (timed: the summary's eval speed), and what confidence.fit needs —
    validation logits, and with out-of-scope texts or a feature scorer the pooled features of every split."""
    max_len, pad_id, batch = cfg.model.max_length_tokens, tokenizer.pad_token_id or 0, cfg.train.eval_batch_size
    features = cfg.ood.method in confidence.FEATURE_SCORERS or any(len(f) for f in splits.oos.values())

    def run(ids, labels) -> confidence.Outputs:
        got = predict_logits(model, ids, pad_id, batch, features=features)
        logits, feats = got if features else (got, None)
        return confidence.Outputs(logits, feats, np.asarray(labels, dtype=int))

    test_ids = encode(splits.test.text, tokenizer, max_len)
    t0 = time.perf_counter()
    out = {"test_ids": test_ids, "test": run(test_ids, splits.labels.encode(splits.test.label))}
    out["seconds"] = time.perf_counter() - t0
    out["validation"] = run(validation.input_ids, validation.labels)
    for split, frame in splits.oos.items():
        out[f"{split}_oos"] = run(encode(frame.text, tokenizer, max_len), [-1] * len(frame))
    if features:
        out["train"] = run(train_set.input_ids, train_set.labels)
    return out


def _run_folder(cfg: Config, dataset: str, resuming: bool, procs) -> Path:
    """The run folder, named and created by the main process and shared with the others (a default name
    has the time in it); an error there is raised on every process, so none waits for the others."""
    outcome: Path | PeftlabError | None = None
    if procs.is_main_process:
        try:
            outcome = rundir.new_run_dir(cfg.output_dir, cfg.run_name, dataset, cfg.adapter.method, resume=resuming)
        except PeftlabError as e:
            outcome = e
    if procs.num_processes > 1:
        outcome = broadcast_object_list([outcome])[0]
    if isinstance(outcome, PeftlabError):
        raise outcome
    return outcome


def _adalora_summary(model, cfg: Config, schedule: tuple[int, int], total_steps: int, rank_history) -> dict:
    ranks = modeling.adalora_ranks(model)
    return {"final_ranks": ranks, "rank_sum": sum(ranks.values()), "modules": len(ranks),
            "budget": cfg.adapter.target_r * len(ranks), "tinit": schedule[0], "tfinal": schedule[1],
            "total_step": total_steps, "effective_trainable_parameters": modeling.adalora_effective_parameters(model, ranks),
            "init_budget": cfg.adapter.init_r * len(ranks), "rank_history": rank_history}


def evaluate(run: str | Path, data: str | Path | None = None, text_columns: list[str] | None = None,
             label_column: str | None = None, batch_size: int = EVAL_BATCH_SIZE) -> dict:
    """Accuracy, macro-F1 and per-class metrics of a run on its own test split (read again from the files it
    recorded; a changed file is an error), or on the file ``data``, read with the run's columns unless given.

    Out-of-scope texts — the run's data.oos_label or ood.label, or with data.known_intents any intent the run
    did not learn — are kept apart: the metrics above are over in-scope texts, and ``confidence`` adds the
    calibration (ECE, Brier) and, with out-of-scope texts, the rejection figures of the run's scorer.
    """
    predictor = load_predictor(run)
    cfg = rundir.open_run(run)[1]
    labels, run_cfg = predictor.labels, rundir.run_config(cfg)
    if data is None:
        test = rundir.test_split(Path(run), cfg)
    else:
        dcfg = run_cfg.data
        dcfg.text_columns, dcfg.label_column = text_columns or dcfg.text_columns, label_column or dcfg.label_column
        test = read_labelled(data, dcfg)
    oos_names = {run_cfg.ood.label} | ({run_cfg.data.oos_label} - {None})
    unknown = set(test.label) - set(labels.names)
    if run_cfg.data.known_intents is not None:
        oos_names |= unknown
    unknown = sorted(unknown - oos_names)
    if unknown:
        raise DataError(f"labels the run never saw: {', '.join(unknown[:5])} ({len(unknown)}); "
                        "evaluate on data with the run's labels (peftlab info RUN lists them)")
    out_of_scope = test.label.isin(oos_names).to_numpy()
    with modeling.merged_for_inference(predictor.model):
        logits, feats = predictor.outputs(test.text.tolist(), batch_size)
    ins = confidence.Outputs(logits, feats, np.asarray([labels.ids.get(x, -1) for x in test.label]))
    out = metrics(ins.logits[~out_of_scope], ins.labels[~out_of_scope], labels.names, per_class=True)
    conf = predictor.confidence or confidence.Confidence()
    oos = ins.take(out_of_scope) if out_of_scope.any() else None
    out["confidence"] = confidence.evaluate(conf, ins.take(~out_of_scope), oos)
    out["out_of_scope_examples"] = int(out_of_scope.sum())
    out["logits"] = logits
    return out


def predict(run: str | Path | Predictor, texts: list[str], batch_size: int = EVAL_BATCH_SIZE, top_k: int = 1,
            threshold: float | None = None) -> list[dict]:
    """One record per text: ``label``, ``score`` (calibrated probability), ``in_scope``, ``ood_score`` and
    ``top_k`` [(label, score), …] best first. A text the run's out-of-scope scorer rejects is labelled
    ``ood.label`` (default ``out_of_scope``) with ``in_scope`` False; ``threshold`` overrides the run's.

    ``run`` is a run folder or an export folder (adapter, merged or ONNX), or a loaded Predictor.
    """
    predictor = run if isinstance(run, Predictor) else load_predictor(run)
    return predictor.predict(texts, top_k, batch_size, threshold)


def info(run: str | Path) -> dict:
    """What a run folder holds: its path, resolved config, summary and label names."""
    path, cfg = rundir.open_run(run)
    return {"run": str(path), "config": cfg, "summary": rundir.read_summary(path), "labels": LabelMap.load(path).names}

