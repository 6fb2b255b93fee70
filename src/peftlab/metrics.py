"""Metrics from logits: accuracy, macro-F1, mean cross-entropy, per-class precision/recall/F1 and the
confusion matrix (scikit-learn). Used on validation during training, on test at its end, by evaluate."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score


def metrics(logits: np.ndarray, labels: list[int] | np.ndarray, names: list[str] | None = None,
            per_class: bool = False) -> dict:
    """accuracy, macro-F1 and mean cross-entropy; with per_class, sklearn's per-label report and the
    confusion matrix too."""
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
