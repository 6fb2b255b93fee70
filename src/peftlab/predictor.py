"""Load once, predict fast: one object per model that evaluate, predict, export's parity checks and serve
all use.

A predictor reads a run folder or an export folder (adapter, merged or ONNX) and turns texts into
logits with length-sorted batches (almost no padding), no gradient state and the tokenizer run once per
call. Several adapters on one backbone share the base model (``load_many``): each predictor then names
its adapter and switches to it before a batch, so callers must not run two predictors of one base at
the same time (serve runs every batch on one thread for that reason).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .batching import collate, encode, length_sorted_batches
from .data import LabelMap
from .errors import RunError

log = logging.getLogger("peftlab")

EXPORT_RECORD = "export.json"
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"


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

    def encode(self, texts: list[str]) -> list[list[int]]:
        return encode(texts, self.tokenizer, self.max_length_tokens)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def logits_from_ids(self, input_ids: list[list[int]], batch_size: int = 64) -> np.ndarray:
        """Logits in the original order of ``input_ids``, computed on length-sorted batches."""
        if self.kind == "onnx":
            out = np.zeros((len(input_ids), len(self.labels)), dtype=np.float32)
            for idx, ids in length_sorted_batches(input_ids, batch_size):
                batch = collate(ids, self.pad_id)
                feeds = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
                out[idx] = self.model.run(["logits"], feeds)[0]
            return out
        from .evaluate import predict_logits

        if self.adapter_name is not None and self.model.active_adapter != self.adapter_name:
            self.model.set_adapter(self.adapter_name)
        return predict_logits(self.model, input_ids, self.pad_id, batch_size)

    def logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self.logits_from_ids(self.encode(texts), batch_size)

    def predict(self, texts: list[str], top_k: int = 1, batch_size: int = 64) -> list[list[tuple[str, float]]]:
        """For each text, the ``top_k`` best (label, softmax score) pairs, best first."""
        return top_labels(self.logits(texts, batch_size), self.labels, top_k)


def top_labels(logits: np.ndarray, labels: LabelMap, top_k: int = 1) -> list[list[tuple[str, float]]]:
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(-1, keepdims=True)
    k = max(1, min(top_k, probs.shape[1]))
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(labels.names[j], float(p[j])) for j in row] for row, p in zip(order, probs, strict=True)]


def read_export_record(path: Path) -> dict | None:
    f = Path(path) / EXPORT_RECORD
    return json.loads(f.read_text()) if f.is_file() else None


def load(path: str | Path, quantized: bool = False, num_threads: int | None = None) -> Predictor:
    """A predictor for a run folder or an export folder (``peftlab export``)."""
    p = Path(path)
    record = read_export_record(p) if p.is_dir() else None
    if record is None:
        from .workflows import load_run

        model, tokenizer, labels, cfg = load_run(p)
        return Predictor(model, tokenizer, labels, cfg["model"]["max_length_tokens"], source=str(p))
    labels = LabelMap.load(p / "labels.json")
    max_len = record["max_length_tokens"]
    fmt = record["format"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(p)
    if fmt == "onnx":
        file = p / (ONNX_INT8_FILE if quantized else ONNX_FILE)
        if not file.is_file():
            raise RunError(f"export '{p}' has no {file.name}" + (" (export it with --quantize)" if quantized else ""))
        session = onnx_session(file, num_threads)
        return Predictor(session, tokenizer, labels, max_len, kind="onnx", source=str(file))
    if fmt == "merged":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(p, use_safetensors=True).eval()
        return Predictor(model, tokenizer, labels, max_len, source=str(p))
    if fmt == "adapter":
        from .modeling import resolve_backbone

        model = load_adapter_model(resolve_backbone(record["backbone"]), p, labels)
        return Predictor(model, tokenizer, labels, max_len, source=str(p))
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


def _base_model(backbone: str, labels: LabelMap):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        backbone, num_labels=len(labels), id2label=labels.id2label,
        label2id={n: i for i, n in labels.id2label.items()}, use_safetensors=True)


def _check_safetensors(folder: Path) -> None:
    if not (Path(folder) / "adapter_model.safetensors").is_file():
        raise RunError(f"'{folder}' has no adapter_model.safetensors (peftlab loads weights only from safetensors)")


def load_adapter_model(backbone: str, adapter_folder: Path, labels: LabelMap, adapter_name: str = "default"):
    """Base model + one adapter through plain PEFT, ready for inference."""
    import warnings

    from peft import PeftModel

    _check_safetensors(adapter_folder)
    with warnings.catch_warnings():
        # AdaLoRA's saved rank_pattern keys end in '.lora_E', which PEFT's generic pattern check reports as
        # unmatched; AdaLoRA applies them itself right after (resize_modules_by_rank_pattern).
        warnings.filterwarnings("ignore", message=".*rank_pattern keys did not match.*")
        model = PeftModel.from_pretrained(_base_model(backbone, labels), adapter_folder, adapter_name=adapter_name)
    return model.eval()


def load_many(sources: dict[str, str | Path]) -> dict[str, Predictor]:
    """Predictors for named run/export folders; adapters that can share a base model share one.

    Adapters share a base when they have the same backbone, number of labels (the head's shape) and PEFT
    type (PEFT keeps one tuner type per model: LoRA and DoRA together, AdaLoRA apart). Merged, full and
    ONNX models are loaded on their own.
    """
    out: dict[str, Predictor] = {}
    shared: dict[tuple, Any] = {}
    for name, src in sources.items():
        spec = adapter_spec(Path(src))
        if spec is None:
            out[name] = load(src)
            continue
        backbone, folder, labels, max_len, tokenizer_dir = spec
        peft_type = json.loads((folder / "adapter_config.json").read_text()).get("peft_type")
        key = (backbone, len(labels), peft_type)
        if key not in shared:
            shared[key] = load_adapter_model(backbone, folder, labels, adapter_name=name)
        else:
            import warnings

            _check_safetensors(folder)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*rank_pattern keys did not match.*")
                shared[key].load_adapter(folder, adapter_name=name, is_trainable=False)
        from transformers import AutoTokenizer

        out[name] = Predictor(shared[key], AutoTokenizer.from_pretrained(tokenizer_dir), labels, max_len,
                              adapter_name=name, source=str(src))
    return out


def adapter_spec(path: Path) -> tuple[str, Path, LabelMap, int, Path] | None:
    """(backbone, adapter folder, labels, max length, tokenizer folder) when ``path`` holds an adapter."""
    record = read_export_record(path)
    if record is not None:
        if record["format"] != "adapter":
            return None
        from .modeling import resolve_backbone

        return (resolve_backbone(record["backbone"]), path, LabelMap.load(path / "labels.json"),
                record["max_length_tokens"], path)
    from .modeling import resolve_backbone
    from .runs import LABELS, open_run

    run, cfg = open_run(path)
    if cfg["adapter"]["method"] == "full":
        return None
    return (resolve_backbone(cfg["model"]["name"]), run / "adapter", LabelMap.load(run / LABELS),
            cfg["model"]["max_length_tokens"], run / "adapter")
