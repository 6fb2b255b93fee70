"""Export a run for production: the adapter alone, a merged transformers model, or ONNX (optionally int8).

Every export is checked before it is kept: the exported model is reloaded the way a user would load it
and run on real labelled texts (the run's test split, or ``--data``) next to the run's own PyTorch
model; the maximum logit difference, the agreement of predicted labels and the accuracy of both go into
``export.json``. An export that does not reproduce the run is an error, and nothing is left behind: the
folder is built under a temporary name and renamed only when the check passes.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import confidence
from . import predictor as predictor_mod
from .data import read_labelled
from .errors import DataError, ExportError
from .files import atomic_folder, write_json
from .modeling import capture_pooled_features
from .predictor import Predictor
from .rundir import (
    ADAPTER,
    EXPORT_RECORD,
    LABELS,
    ONNX_FILE,
    ONNX_INT8_FILE,
    open_run,
    run_config,
    test_split,
    versions,
)

log = logging.getLogger("peftlab")

FORMATS = ("adapter", "merged", "onnx")
# Largest logit difference an unquantised export may show against the run: fp32 merges and ONNX
# kernels reorder sums (~1e-6 here); anything near 1e-3 means a wrong graph or lost weights.
MAX_LOGIT_DIFF = 1e-3
ONNX_OPSET = 17
# The same for the out-of-scope score, relative to the largest score (a Mahalanobis distance sums hundreds
# of squared terms; merged and ONNX exports of MiniLM showed ~1e-5): only a score this close to the
# threshold can decide differently.
MAX_SCORE_DIFF = 1e-4


def export(run: str | Path, fmt: str, out: str | Path | None = None, quantize: bool = False,
           data: str | Path | None = None, parity_examples: int = 512, force: bool = False) -> Path:
    """Export ``run`` as ``fmt`` into ``out`` (default RUN/export-FMT); return the export folder. The export
    is reloaded the way a user would load it and checked against the run on real texts (module docstring)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if quantize and fmt != "onnx":
        raise ExportError("--quantize applies to --format onnx only")
    run_path, cfg = open_run(run)
    method = cfg["adapter"]["method"]
    if fmt == "adapter" and method == "full":
        raise ExportError(f"run '{run_path}' is full fine-tuning and has no adapter; use --format merged or onnx")
    target = Path(out) if out else run_path / f"export-{fmt}"
    if target.exists() and any(target.iterdir()) and not force:
        raise ExportError(f"'{target}' already exists; choose another --output or pass --force to replace it")
    texts, labels_true = _parity_texts(run_path, cfg, data, parity_examples)

    started = time.perf_counter()
    reference = predictor_mod.load(run_path)
    ids = reference.encode(texts)
    ref_out = reference.outputs_from_ids(ids)
    y = None if labels_true is None else np.array([reference.labels.ids.get(x, -1) for x in labels_true])
    record = {"format": fmt, "source_run": str(run_path.resolve()), "method": method,
              "backbone": cfg["model"]["name"], "max_length_tokens": cfg["model"]["max_length_tokens"],
              "versions": versions()}
    with atomic_folder(target) as tmp:  # renamed into place only when the check below passes
        shutil.copy(run_path / LABELS, tmp / LABELS)
        for name in (confidence.FILE, confidence.TENSORS):  # temperature, threshold, class statistics
            if (run_path / name).is_file():
                shutil.copy(run_path / name, tmp / name)
        if fmt == "adapter":
            for f in (run_path / ADAPTER).iterdir():
                if f.is_file():
                    shutil.copy(f, tmp / f.name)
        else:
            merged = _merge(reference)
            if fmt == "merged":
                merged.save_pretrained(tmp, safe_serialization=True)
            else:
                merged.config.save_pretrained(tmp)
                _export_onnx(merged, reference.pad_id, tmp / ONNX_FILE)
        reference.tokenizer.save_pretrained(tmp)
        write_json(tmp / EXPORT_RECORD, record)  # the loader needs it; rewritten below with the check

        parity = {"examples": len(texts), "data": str(data) if data else "the run's test split"}
        parity.update(_compare(reference, ref_out, predictor_mod.load(tmp), ids, y))
        if parity["max_abs_logit_diff"] > MAX_LOGIT_DIFF or parity.get("max_rel_score_diff", 0.0) > MAX_SCORE_DIFF:
            raise ExportError(f"the {fmt} export does not reproduce the run: max logit difference "
                              f"{parity['max_abs_logit_diff']:.2e}, label agreement {100 * parity['label_agreement']:.2f}%"
                              + (f", out-of-scope decisions agree on {100 * parity['decision_agreement']:.2f}%"
                                 if "decision_agreement" in parity else ""))
        if quantize:
            _quantize(tmp / ONNX_FILE, tmp / ONNX_INT8_FILE)
            parity["int8"] = _compare(reference, ref_out, predictor_mod.load(tmp, quantized=True), ids, y)
            if parity["int8"].get("decision_agreement", 1.0) < 0.99:
                log.warning("export: the int8 model decides out-of-scope differently from the run on %.1f%% of the "
                            "parity texts (int8 weights move the pooled features); the fp32 ONNX model agrees",
                            100 * (1 - parity["int8"]["decision_agreement"]))
        record["parity"] = parity
        record["seconds"] = round(time.perf_counter() - started, 2)
        write_json(tmp / EXPORT_RECORD, record)
    return target


def _parity_texts(run_path: Path, cfg: dict, data, n: int) -> tuple[list[str], list[str] | None]:
    """Up to ``n`` real texts (with labels when known): ``data`` if given, else the run's test split (a data
    file changed since training only warns: any real texts check that the export reproduces the run)."""
    if data is not None:
        frame = read_labelled(data, run_config(cfg).data, require_labels=False)
    else:
        try:
            frame = test_split(run_path, cfg, strict=False)
        except DataError as e:
            raise ExportError(f"the parity check needs the run's test data ({e}); or give --data FILE") from None
    if len(frame) > n:
        frame = frame.sample(n=n, random_state=0)
    labels = frame["label"].tolist() if "label" in frame.columns else None
    return frame["text"].tolist(), labels


def _compare(reference: Predictor, ref_out, export: Predictor, ids, y: np.ndarray | None) -> dict:
    """Max logit difference, label agreement, agreement of out-of-scope decisions (when the run rejects)
    and, with true labels ``y`` (ids), both accuracies."""
    ref, ref_features = ref_out
    got, features = export.outputs_from_ids(ids)
    out = {"max_abs_logit_diff": float(np.abs(ref - got).max()),
           "label_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean())}
    conf = reference.confidence
    if conf is not None and conf.rejects:
        ref_accept, ref_scores = conf.decide(ref, ref_features)
        accept, scores = export.confidence.decide(got, features)
        out.update(decision_agreement=float((ref_accept == accept).mean()), in_scope_kept=float(accept.mean()))
        if scores is not None:  # relative to the scores' size: Mahalanobis distances run into the hundreds
            out["max_rel_score_diff"] = float(np.abs(ref_scores - scores).max() / (1 + np.abs(ref_scores).max()))
    if y is not None and (y >= 0).any():  # in-scope texts only (-1: out of scope)
        known = y >= 0
        out["accuracy_reference"] = float((ref.argmax(-1) == y)[known].mean())
        out["accuracy_export"] = float((got.argmax(-1) == y)[known].mean())
    return out


def _merge(reference: Predictor):
    """A plain transformers model with the adapter folded into the weights and our label names."""
    model = reference.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.config.id2label = reference.labels.id2label
    model.config.label2id = {n: i for i, n in reference.labels.id2label.items()}
    return model.eval()


def _export_onnx(model, pad_id: int, file: Path) -> None:
    """torch.onnx (TorchScript exporter) with dynamic batch and sequence axes; inputs ids + mask."""
    class Outputs(torch.nn.Module):  # the graph returns tensors: logits and the pooled features
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            with capture_pooled_features(self.inner) as seen:
                logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits
            return logits, seen[-1]

    ids = torch.full((2, 8), pad_id, dtype=torch.long)
    ids[:, :5] = torch.arange(100, 105)
    mask = (ids != pad_id).long()
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "logits": {0: "batch"}, "features": {0: "batch"}}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python bools in the attention mask code
        torch.onnx.export(Outputs(model), (ids, mask), str(file), input_names=["input_ids", "attention_mask"],
                          output_names=["logits", "features"], dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False)


def _quantize(src: Path, dst: Path) -> None:
    """int8 dynamic quantisation of the weights (onnxruntime); activations stay float."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser advises shape pre-processing on the root logger; not needed here
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
