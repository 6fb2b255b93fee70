"""Metrics: accuracy, macro-F1, per-class precision/recall/F1 and loss, from logits (scikit-learn)."""

from __future__ import annotations

import numpy as np
import torch

from .batching import collate, length_sorted_batches


@torch.inference_mode()
def predict_logits(model, input_ids: list[list[int]], pad_id: int, batch_size: int = 64,
                   device: torch.device | str | None = None) -> np.ndarray:
    """Logits for every text in the original order, from length-sorted batches without labels.

    Labels are never passed: AdaLoRA's forward with labels adds its orthogonal regulariser and fails
    in inference mode; the loss is computed here from the logits instead.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    out = np.zeros((len(input_ids), model.config.num_labels), dtype=np.float32)
    for idx, ids in length_sorted_batches(input_ids, batch_size):
        batch = {k: v.to(device) for k, v in collate(ids, pad_id).items()}
        out[idx] = model(**batch).logits.float().cpu().numpy()
    model.train(was_training)
    return out


def metrics(logits: np.ndarray, labels: list[int] | np.ndarray, names: list[str] | None = None,
            per_class: bool = False) -> dict:
    """accuracy, macro-F1 and mean cross-entropy; with per_class, sklearn's per-label report and the
    confusion matrix too."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    y = np.asarray(labels)
    pred = logits.argmax(-1)
    logp = torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()
    out = {
        "accuracy": float(accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, average="macro", labels=np.arange(logits.shape[1]), zero_division=0)),
        "loss": float(-logp[np.arange(len(y)), y].mean()),
        "examples": len(y),
    }
    if per_class:
        report = classification_report(y, pred, labels=np.arange(logits.shape[1]), target_names=names,
                                       output_dict=True, zero_division=0)
        out["per_class"] = {n: {k: report[n][k] for k in ("precision", "recall", "f1-score", "support")}
                            for n in (names or [])}
        # rows: true label id, columns: predicted label id (the report's confused pairs and heatmap)
        out["confusion"] = confusion_matrix(y, pred, labels=np.arange(logits.shape[1])).tolist()
    return out
