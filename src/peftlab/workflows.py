"""Workflows: compose the stages. These functions are the Python API; the CLI only translates to them.

    import peftlab
    run = peftlab.train(peftlab.config.load("configs/banking77-lora.yaml"))
    peftlab.evaluate(run)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import yaml

from . import config as config_mod
from . import data as data_mod
from .batching import TrainSet, encode
from .config import Config
from .data import LabelMap
from .errors import DataError, PeftlabError, RunError
from .runs import CONFIG, LABELS, SUMMARY, new_run_dir, open_run, read_jsonl, versions, write_json, write_text

log = logging.getLogger("peftlab")


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(cfg: Config, progress: bool = True, resume: bool | None = None) -> Path:
    """Train, evaluate on test, and write a complete run folder; return its path.

    An unfinished run of the same ``run_name`` that saved a resume state is continued when ``resume`` is
    None (if its config matches) or True; ``resume=False`` discards it and starts over.
    """
    from accelerate.utils import set_seed

    from . import modeling, tracking
    from .evaluate import metrics, predict_logits
    from .report import write_report
    from .train import AdaLoraSchedule, fit, optimizer_steps, process_state

    wall_start = time.perf_counter()
    tracking.check(cfg.train.report_to)  # a missing tracker library fails before any work
    modeling.check_backbone(cfg.model)  # so does a model folder peftlab will not load
    procs = process_state(cfg.train)  # and a launch that would not train as asked
    is_main, num_processes = procs.is_main_process, procs.num_processes
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    # Data first: AdaLoRA's total_step depends on the number of training examples.
    splits = data_mod.load(cfg.data, cfg.train.seed)
    for note in splits.notes:
        log.warning(note)
    _per_epoch, total_steps = optimizer_steps(len(splits.train), cfg.train)
    schedule = None
    if cfg.adapter.method == "adalora":
        schedule = config_mod.check_adalora_schedule(cfg.adapter, total_steps)
    state = _resume_state(cfg, resume)
    outcome: Path | PeftlabError | None = None
    if is_main:
        try:
            outcome = new_run_dir(cfg.output_dir, cfg.run_name, splits.name, cfg.adapter.method, resume=state is not None)
        except PeftlabError as e:
            outcome = e
    if num_processes > 1:  # one folder for all: the main process names it (a default name has the time)
        from accelerate.utils import broadcast_object_list

        outcome = broadcast_object_list([outcome])[0]
    if isinstance(outcome, PeftlabError):
        raise outcome  # on every process, so none waits for the others
    run_dir = outcome
    set_seed(cfg.train.seed)
    model, tokenizer, details = modeling.build(cfg.model, cfg.adapter, splits.labels.id2label, total_steps, schedule)
    resolved = config_mod.to_dict(cfg)
    resolved["train"]["learning_rate"] = cfg.learning_rate
    if cfg.model.name != modeling.DEFAULT_MODEL_NAME:  # a relative folder would break reloads from elsewhere
        resolved["model"]["name"] = details["backbone"]
    if schedule:
        resolved["adapter"]["tinit"], resolved["adapter"]["tfinal"] = schedule
    if is_main:
        record = {"versions": versions(), **details, "dataset": splits.name, "notes": splits.notes}
        write_text(run_dir / CONFIG, config_mod.dump(config_mod.from_dict(resolved))
                   + "# recorded by peftlab, ignored when this file is used as a config:\n"
                   + yaml.safe_dump({config_mod.RUN_RECORD_KEY: record}, sort_keys=False))
        splits.labels.save(run_dir / LABELS)
    initial_adapter = None
    if cfg.adapter.method != "full" and cfg.adapter.init_lora_weights in ("pissa", "olora") and is_main:
        # PiSSA/OLoRA rewrite the base weights; saving the initial adapter lets PEFT convert the trained
        # one into a plain LoRA adapter that loads on the *original* backbone (peft docs, PiSSA).
        initial_adapter = run_dir / "initial_adapter"  # PEFT uses the folder name as an adapter name: no dots
        init = model.peft_config["default"].init_lora_weights
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(initial_adapter)
        model.peft_config["default"].init_lora_weights = init
    trainable, total = modeling.count_parameters(model)
    log.info("%s on %s: trainable %s", cfg.adapter.method, splits.name, modeling.format_parameters(trainable, total))

    max_len = cfg.model.max_length_tokens
    pad_id = tokenizer.pad_token_id or 0
    train_set = TrainSet(encode(splits.train.text, tokenizer, max_len), splits.labels.encode(splits.train.label), pad_id)
    val_ids = encode(splits.validation.text, tokenizer, max_len)
    val_labels = splits.labels.encode(splits.validation.label)
    extra = None
    if cfg.train.final_epoch_on_train_and_validation:
        extra = TrainSet(train_set.input_ids + val_ids, train_set.labels + val_labels, pad_id)
    adalora = AdaLoraSchedule.for_schedule(total_steps, schedule[1]) if schedule else None
    head_modules = [m.rsplit(".", 1)[-1] for m in details["newly_initialised"]]
    # Trackers see what metrics.jsonl gets (fit's on_eval), then the test metrics; closed as failed
    # if anything below raises.
    with tracking.start(cfg.train, run_dir, resolved, enabled=is_main) as tracker:
        result = fit(model, train_set, val_ids, val_labels, cfg.train, cfg.learning_rate, run_dir, head_modules,
                     adalora=adalora, extra_set=extra, on_eval=tracker.log_eval, resume=state)

        summary: dict = {}
        if is_main:
            test_ids = encode(splits.test.text, tokenizer, max_len)
            t0 = time.perf_counter()
            with modeling.merged_for_inference(model):
                logits = predict_logits(model, test_ids, pad_id, cfg.train.eval_batch_size)
            eval_seconds = time.perf_counter() - t0
            test = metrics(logits, splits.labels.encode(splits.test.label), splits.labels.names, per_class=True)
            summary = {
                "method": cfg.adapter.method, "dataset": splits.name, "notes": splits.notes,
                "backbone": details["backbone"], "splits": splits.sizes(), "num_labels": len(splits.labels),
                "trainable_parameters": trainable, "total_parameters": total,
                "trainable_percent": 100 * trainable / total,
                "parameters": modeling.format_parameters(trainable, total),
                "optimizer_steps": result.global_step, "planned_optimizer_steps": total_steps,
                "best_step": result.best.get("step"), "best_epoch": result.best.get("epoch"),
                "best_validation": {k: result.best.get(f"eval_{k}") for k in ("accuracy", "f1", "loss")},
                "stopped_early": result.stopped_early,
                "final_epoch_on_train_and_validation": result.final_epoch_on_train_and_validation,
                "test_accuracy": test["accuracy"], "test_f1": test["f1"], "test_loss": test["loss"],
                "train_seconds": round(result.train_seconds, 2),
                "wall_seconds": round(time.perf_counter() - wall_start, 2),
                "train_samples_per_second": round(result.train_examples_seen / max(result.train_seconds, 1e-9), 2),
                "eval_samples_per_second": round(len(test_ids) / max(eval_seconds, 1e-9), 2),
                "peak_memory_mb": round(_peak_memory_mb(), 1),
                "device": str(next(model.parameters()).device), "num_processes": num_processes,
                # per-class example counts: the report plots test F1 against training examples (rare intents)
                "label_counts": {name: _label_counts(frame, splits.labels.names) for name, frame in
                                 (("train", splits.train), ("validation", splits.validation), ("test", splits.test))},
            }
            if cfg.adapter.method == "adalora":
                ranks = modeling.adalora_ranks(model)
                summary["adalora"] = {
                    "final_ranks": ranks, "rank_sum": sum(ranks.values()), "modules": len(ranks),
                    "budget": cfg.adapter.target_r * len(ranks), "tinit": schedule[0], "tfinal": schedule[1],
                    "total_step": total_steps,
                    "effective_trainable_parameters": modeling.adalora_effective_parameters(model, ranks),
                    "init_budget": cfg.adapter.init_r * len(ranks), "rank_history": result.rank_history,
                }
            _save_model(model, tokenizer, run_dir, cfg.adapter.method, initial_adapter)
            write_json(run_dir / "test_metrics.json", test)
            write_report(run_dir, summary, read_jsonl(run_dir / "metrics.jsonl"))
            _remove_checkpoints(run_dir)
            tracker.log_final(summary, result.global_step)
            write_json(run_dir / SUMMARY, summary)  # last: marks the run complete
    procs.wait_for_everyone()  # the other processes return once the run folder is complete
    return run_dir


def _resume_state(cfg: Config, resume: bool | None):
    """The resume state of the unfinished run ``cfg`` names, if it is to be continued (see train)."""
    from . import checkpoint
    from .runs import CHECKPOINTS

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
    diffs = config_mod.differences(cfg, yaml.safe_load((folder / CONFIG).read_text()))
    if diffs:
        raise RunError(f"the unfinished run '{folder}' was started with another config ({'; '.join(diffs[:3])}): "
                       "resume it with the same config, or pass --restart to discard it")
    log.info("continuing the unfinished run %s from optimizer step %d", folder, state.meta["step"])
    return state


def _label_counts(frame, names: list[str]) -> dict[str, int]:
    counts = frame.label.astype(str).value_counts()
    return {name: int(counts.get(name, 0)) for name in names}


def _save_model(model, tokenizer, run_dir: Path, method: str, initial_adapter: Path | None = None) -> None:
    """Full fine-tuning: a transformers folder; PEFT methods: the standard adapter layout."""
    import shutil

    target = run_dir / ("model" if method == "full" else "adapter")
    tmp = run_dir / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if initial_adapter is not None:
        _save_converted(model, tmp, initial_adapter)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _save_converted(model, folder: Path, initial_adapter: Path) -> None:
    """Save a PiSSA/OLoRA adapter converted to plain LoRA on the original backbone.

    PEFT's conversion (peft 0.21) writes only the lora_A/lora_B deltas and drops modules_to_save —
    the trained head — so a reload would get a random classifier. Put those tensors back.
    """
    import shutil

    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    model.save_pretrained(folder, path_initial_model_for_weight_conversion=str(initial_adapter))
    shutil.rmtree(initial_adapter, ignore_errors=True)
    weights = folder / "adapter_model.safetensors"
    state = load_file(weights)
    for key, tensor in get_peft_model_state_dict(model).items():
        if "lora_" not in key and key not in state:
            state[key] = tensor.detach().cpu().contiguous()
    save_file(state, weights, metadata={"format": "pt"})


def _remove_checkpoints(run_dir: Path) -> None:
    import shutil

    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def load_run(run: str | Path, device: str | None = None):
    """(model, tokenizer, labels, config dict) from a run folder, through plain transformers + PEFT."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .modeling import resolve_backbone

    path, cfg = open_run(run)
    labels = LabelMap.load(path / LABELS)
    method = cfg["adapter"]["method"]
    if method == "full":
        model = AutoModelForSequenceClassification.from_pretrained(path / "model", use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path / "model")
    else:
        from .predictor import load_adapter_model

        model = load_adapter_model(resolve_backbone(cfg["model"]["name"]), path / "adapter", labels)
        tokenizer = AutoTokenizer.from_pretrained(path / "adapter")
    model.eval()
    if device:
        model.to(device)
    return model, tokenizer, labels, cfg


def evaluate(run: str | Path, data: str | Path | None = None, text_columns: list[str] | None = None,
             label_column: str | None = None, batch_size: int = 64) -> dict:
    """Accuracy, macro-F1 and per-class metrics of a run on its test split, or on ``data``."""
    from .evaluate import metrics, predict_logits

    model, tokenizer, labels, cfg = load_run(run)
    if data is None:
        dcfg = config_mod.from_dict({k: cfg[k] for k in ("model", "data", "adapter", "train")}).data
        test = data_mod.load(dcfg, cfg["train"]["seed"]).test
    else:
        cols = text_columns or cfg["data"]["text_columns"] or ["text"]
        test = data_mod.to_frame(data_mod.read_table(data), cols, label_column or cfg["data"]["label_column"] or "label",
                                 str(data))
    unknown = sorted(set(test.label) - set(labels.names))
    if unknown:
        raise DataError(f"labels the run never saw: {', '.join(unknown[:5])} ({len(unknown)}); "
                        "evaluate on data with the run's labels (peftlab info RUN lists them)")
    ids = encode(test.text, tokenizer, cfg["model"]["max_length_tokens"])
    from .modeling import merged_for_inference

    with merged_for_inference(model):
        logits = predict_logits(model, ids, tokenizer.pad_token_id or 0, batch_size)
    out = metrics(logits, labels.encode(test.label), labels.names, per_class=True)
    out["logits"] = logits
    return out


def predict(run: str | Path, texts: list[str], batch_size: int = 64, top_k: int = 1):
    """Labels and scores (softmax) for ``texts``: a list of [(label, score), …] per text, best first.

    ``run`` is a run folder or an export folder (adapter, merged or ONNX), or a loaded Predictor.
    """
    from .predictor import Predictor, load

    predictor = run if isinstance(run, Predictor) else load(run)
    return predictor.predict(texts, top_k, batch_size)


def info(run: str | Path) -> dict:
    path, cfg = open_run(run)
    from .runs import read_summary

    return {"run": str(path), "config": cfg, "summary": read_summary(path),
            "labels": LabelMap.load(path / LABELS).names}
