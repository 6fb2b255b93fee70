"""Load once, predict fast: the logits of many texts, and one object per model that evaluate, predict,
export's parity checks and serve all use.

``predict_logits`` runs a torch model over length-sorted batches (almost no padding), without gradient
state and without labels. A Predictor reads a run folder or an export folder (adapter, merged or ONNX)
and turns texts into logits and top-k labels. Several adapters on one backbone share the base model
(``load_many``): each predictor then names its adapter and switches to it before a batch, so callers must
not run two predictors of one base at the same time (serve runs every batch on one thread for that reason).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from . import modeling
from .confidence import Confidence
from .config import EVAL_BATCH_SIZE
from .errors import RunError
from .labels import LabelMap
from .rundir import ADAPTER, EXPORT_RECORD, ONNX_FILE, ONNX_INT8_FILE, load_run, open_run, read_export_record
from .tokens import collate, encode, length_sorted_batches


@torch.inference_mode()
def predict_logits(model, input_ids, pad_id: int, batch_size: int = EVAL_BATCH_SIZE,
                   device: torch.device | str | None = None, features: bool = False):
    """Logits for every text in the original order, from length-sorted batches without labels; with
    ``features``, (logits, pooled features) — the head's input, for the out-of-scope scores.

    Labels are never passed: AdaLoRA's forward with labels adds its orthogonal regulariser and fails
    in inference mode; losses are computed from the logits instead (metrics.py).
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    out = np.zeros((len(input_ids), model.config.num_labels), dtype=np.float32)
    feats = None
    with modeling.capture_pooled_features(model) if features else contextlib.nullcontext([]) as seen:
        for idx, ids in length_sorted_batches(input_ids, batch_size):
            batch = {k: v.to(device) for k, v in collate(ids, pad_id).items()}
            out[idx] = model(**batch).logits.float().cpu().numpy()
            if features:
                if feats is None:
                    feats = np.zeros((len(input_ids), seen[-1].shape[-1]), dtype=np.float32)
                feats[idx] = seen[-1].float().cpu().numpy()
                seen.clear()
    model.train(was_training)
    if features:
        return out, feats if feats is not None else np.zeros((0, 0), dtype=np.float32)
    return out


def top_labels(probs: np.ndarray, labels: LabelMap, top_k: int = 1) -> list[list[tuple[str, float]]]:
    """For each row of probabilities, the ``top_k`` best (label, probability) pairs, best first (ties: lower id)."""
    k = max(1, min(top_k, probs.shape[1]))
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(labels.names[j], float(p[j])) for j in row] for row, p in zip(order, probs, strict=True)]


def results(predictor: Predictor, logits: np.ndarray, features: np.ndarray | None, top_k: int = 1,
            threshold: float | None = None) -> list[dict]:
    """One record per text: ``label`` and ``score`` (calibrated probability of the best intent), ``in_scope``,
    ``ood_score`` (the deciding scorer's value, None without one) and ``top_k`` [(label, probability), …].
    A rejected text is labelled with the out-of-scope label; its top_k still lists the intents."""
    conf = predictor.confidence or Confidence()
    ranked = top_labels(conf.probabilities(logits), predictor.labels, top_k)
    accepted, scores = conf.decide(logits, features, threshold)
    return [{"label": top[0][0] if ok else conf.label, "score": top[0][1], "in_scope": bool(ok),
             "ood_score": None if scores is None else float(scores[i]), "top_k": top}
            for i, (top, ok) in enumerate(zip(ranked, accepted, strict=True))]


@dataclass
class Predictor:
    """A loaded model with what it needs to classify texts: tokenizer, labels, max length."""

    model: Any  # a torch module, or an onnxruntime InferenceSession when kind == "onnx"
    tokenizer: Any
    labels: LabelMap
    max_length_tokens: int
    kind: str = "torch"  # "torch" | "onnx"
    adapter_name: str | None = None  # set when the model is a PeftModel shared by several predictors
    source: str = ""
    confidence: Confidence | None = None  # temperature and out-of-scope decision; None: raw softmax, no rejection

    def encode(self, texts: list[str]):
        return encode(texts, self.tokenizer, self.max_length_tokens)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    @property
    def needs_features(self) -> bool:
        return self.confidence is not None and self.confidence.needs_features

    def logits_from_ids(self, input_ids, batch_size: int = EVAL_BATCH_SIZE, features: bool = False):
        """Logits in the original order of ``input_ids``, computed on length-sorted batches; with
        ``features``, (logits, pooled features)."""
        if self.kind == "onnx":
            out = np.zeros((len(input_ids), len(self.labels)), dtype=np.float32)
            feats = None
            names = ["logits", "features"] if features else ["logits"]
            if features and "features" not in {o.name for o in self.model.get_outputs()}:
                raise RunError(f"ONNX model '{self.source}' has no features output (exported before peftlab "
                               "computed out-of-scope scores): export the run again")
            for idx, ids in length_sorted_batches(input_ids, batch_size):
                batch = collate(ids, self.pad_id)
                feeds = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
                got = self.model.run(names, feeds)
                out[idx] = got[0]
                if features:
                    if feats is None:
                        feats = np.zeros((len(input_ids), got[1].shape[-1]), dtype=np.float32)
                    feats[idx] = got[1]
            return (out, feats) if features else out
        if self.adapter_name is not None and self.model.active_adapter != self.adapter_name:
            self.model.set_adapter(self.adapter_name)
        return predict_logits(self.model, input_ids, self.pad_id, batch_size, features=features)

    def logits(self, texts: list[str], batch_size: int = EVAL_BATCH_SIZE) -> np.ndarray:
        return self.logits_from_ids(self.encode(texts), batch_size)

    def outputs_from_ids(self, input_ids, batch_size: int = EVAL_BATCH_SIZE) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, pooled features when the out-of-scope decision needs them, else None)."""
        if self.needs_features:
            return self.logits_from_ids(input_ids, batch_size, features=True)
        return self.logits_from_ids(input_ids, batch_size), None

    def outputs(self, texts: list[str], batch_size: int = EVAL_BATCH_SIZE) -> tuple[np.ndarray, np.ndarray | None]:
        return self.outputs_from_ids(self.encode(texts), batch_size)

    def predict(self, texts: list[str], top_k: int = 1, batch_size: int = EVAL_BATCH_SIZE,
                threshold: float | None = None) -> list[dict]:
        """For each text: label, calibrated score, in_scope, ood_score and the ``top_k`` best (label, score)
        pairs (``results``); ``threshold`` overrides the run's out-of-scope threshold."""
        check_threshold(self, threshold)
        return results(self, *self.outputs(texts, batch_size), top_k, threshold)


def check_threshold(predictor: Predictor, threshold: float | None) -> None:
    """Refuse a threshold override that the predictor's scorer cannot use, naming the range."""
    if threshold is None:
        return
    conf = predictor.confidence
    if conf is None or conf.method == "none":
        raise RunError(f"threshold: '{predictor.source}' rejects nothing (trained with ood.method none); "
                       "retrain with ood.method msp, energy, mahalanobis or knn")
    low, high = SCORE_RANGES[conf.method]
    if not (low <= threshold <= high) or not np.isfinite(threshold):
        where = (f"a value in [{low:g}, {high:g}]" if np.isfinite(low) else
                 f"a number <= {high:g}" if np.isfinite(high) else "a finite number")
        raise RunError(f"threshold: {threshold:g} is out of range for the {conf.method} score (give {where}; "
                       f"the trained threshold is {conf.threshold:.4g})")


# The values each in-scope score can take (a threshold outside them accepts or rejects everything).
SCORE_RANGES = {"msp": (0.0, 1.0), "knn": (-1.0, 1.0), "energy": (-np.inf, np.inf), "mahalanobis": (-np.inf, 0.0)}


def load(path: str | Path, quantized: bool = False, num_threads: int | None = None) -> Predictor:
    """A predictor for a run folder or an export folder (``peftlab export``)."""
    p = Path(path)
    record = read_export_record(p) if p.is_dir() else None
    if record is None:
        model, tokenizer, labels, cfg = load_run(p)
        return Predictor(model, tokenizer, labels, cfg["model"]["max_length_tokens"], source=str(p),
                         confidence=Confidence.load(open_run(p)[0]))
    labels, max_len, fmt = LabelMap.load(p), record["max_length_tokens"], record["format"]
    tokenizer, conf = AutoTokenizer.from_pretrained(p), Confidence.load(p)
    if fmt == "onnx":
        file = p / (ONNX_INT8_FILE if quantized else ONNX_FILE)
        if not file.is_file():
            raise RunError(f"export '{p}' has no {file.name}" + (" (export it with --quantize)" if quantized else ""))
        return Predictor(onnx_session(file, num_threads), tokenizer, labels, max_len, kind="onnx", source=str(file),
                         confidence=conf)
    if fmt == "merged":
        return Predictor(modeling.load_classifier(p).eval(), tokenizer, labels, max_len, source=str(p), confidence=conf)
    if fmt == "adapter":
        model = modeling.load_adapter_model(modeling.resolve_backbone(record["backbone"]), p, labels)
        return Predictor(model, tokenizer, labels, max_len, source=str(p), confidence=conf)
    raise RunError(f"export '{p}': unknown format {fmt!r} in {EXPORT_RECORD}")


def onnx_session(file: Path, num_threads: int | None = None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise RunError("ONNX models need onnxruntime: pip install 'peftlab[onnx]'") from None
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if num_threads:
        opts.intra_op_num_threads = num_threads
    return ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"])


@dataclass
class AdapterSource:
    """Where an adapter and what it needs come from: a run's adapter/ or an adapter export."""

    backbone: str
    folder: Path
    labels: LabelMap
    max_length_tokens: int
    confidence: Confidence | None = None


def adapter_source(path: Path) -> AdapterSource | None:
    """The adapter that ``path`` (a run or export folder) holds, or None for merged, full and ONNX models."""
    record = read_export_record(path)
    if record is not None:
        if record["format"] != "adapter":
            return None
        return AdapterSource(modeling.resolve_backbone(record["backbone"]), path, LabelMap.load(path),
                             record["max_length_tokens"], Confidence.load(path))
    run, cfg = open_run(path)
    if cfg["adapter"]["method"] == "full":
        return None
    return AdapterSource(modeling.resolve_backbone(cfg["model"]["name"]), run / ADAPTER, LabelMap.load(run),
                         cfg["model"]["max_length_tokens"], Confidence.load(run))


def load_many(sources: dict[str, str | Path]) -> dict[str, Predictor]:
    """Predictors for named run/export folders; adapters that can share a base model share one.

    Adapters share a base when they have the same backbone, number of labels (the head's shape) and PEFT
    type (PEFT keeps one tuner type per model: LoRA and DoRA together, AdaLoRA apart). Merged, full and
    ONNX models are loaded on their own.
    """
    out: dict[str, Predictor] = {}
    shared: dict[tuple, Any] = {}
    for name, src in sources.items():
        spec = adapter_source(Path(src))
        if spec is None:
            out[name] = load(src)
            continue
        key = (spec.backbone, len(spec.labels), modeling.peft_type(spec.folder))
        if key not in shared:
            shared[key] = modeling.load_adapter_model(spec.backbone, spec.folder, spec.labels, adapter_name=name)
        else:
            modeling.add_adapter(shared[key], spec.folder, name)
        out[name] = Predictor(shared[key], AutoTokenizer.from_pretrained(spec.folder), spec.labels,
                              spec.max_length_tokens, adapter_name=name, source=str(src),
                              confidence=spec.confidence)
    return out
