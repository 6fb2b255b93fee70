"""Metrics from logits: accuracy, macro-F1, mean cross-entropy, per-class precision/recall/F1 and the
confusion matrix (scikit-learn). Used on validation during training, on test at its end, by evaluate.
Also: calibration (ECE, Brier, reliability) and out-of-scope rejection (AUROC, FPR@95, F1, risk-coverage)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)


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


# ------------------------------------------------------------------------------ calibration

def calibration(probs: np.ndarray, labels: list[int] | np.ndarray, bins: int = 15) -> dict:
    """Expected calibration error (equal-width confidence bins), Brier score (multi-class, mean squared
    error of the probability vector), and the reliability diagram's points."""
    y = np.asarray(labels)
    conf, pred = probs.max(-1), probs.argmax(-1)
    correct = (pred == y).astype(float)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    acc = np.bincount(which, correct, minlength=bins) / np.maximum(count, 1)
    mean_conf = np.bincount(which, conf, minlength=bins) / np.maximum(count, 1)
    onehot = np.eye(probs.shape[1])[y]
    return {"ece": float((count / len(y) * np.abs(acc - mean_conf)).sum()),
            "brier": float(((probs - onehot) ** 2).sum(-1).mean()),
            "reliability": {"confidence": mean_conf.round(5).tolist(), "accuracy": acc.round(5).tolist(),
                            "count": count.tolist()}}


# ------------------------------------------------------------------------- out-of-scope rejection

def rejection(scores_in: np.ndarray, scores_out: np.ndarray, threshold: float, correct_in: np.ndarray,
              rejected_in: np.ndarray | None = None, rejected_out: np.ndarray | None = None) -> dict:
    """How well a score (higher: more in scope) and its threshold separate in-scope from out-of-scope texts.

    in_scope_accuracy counts a rejected in-scope text as wrong (Larson et al., 2019); out-of-scope is the
    positive class of precision/recall/F1; AUROC and FPR@95 (out-of-scope texts accepted at the threshold that
    keeps 95 % of in-scope texts) need no threshold; overall_accuracy is over the intents plus 'out of scope'.
    ``rejected_in``/``rejected_out`` add rejections made otherwise (an out-of-scope class that was predicted).
    """
    rej_in = scores_in < threshold
    rej_out = scores_out < threshold
    if rejected_in is not None:
        rej_in, rej_out = rej_in | rejected_in, rej_out | rejected_out
    out = {"threshold": float(threshold), "in_scope_kept": float(1 - rej_in.mean()),
           "in_scope_accuracy": float((correct_in & ~rej_in).mean())}
    if len(scores_out):
        truth = np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))]
        p, r, f, _ = precision_recall_fscore_support(truth, np.r_[rej_in, rej_out], average="binary", zero_division=0)
        both = np.r_[scores_in, scores_out]
        at95 = np.quantile(scores_in, 0.05)
        out.update(oos_precision=float(p), oos_recall=float(r), oos_f1=float(f),
                   auroc=float(roc_auc_score(truth, -both)), fpr_at_95=float((scores_out >= at95).mean()),
                   overall_accuracy=float(((correct_in & ~rej_in).sum() + rej_out.sum()) / len(truth)))
    return out


def risk_coverage(scores: np.ndarray, correct: np.ndarray, points: int = 50) -> dict:
    """Selective classification on in-scope texts: keeping the most confident fraction (coverage), the
    error rate among those kept (risk)."""
    order = np.argsort(-scores, kind="stable")
    errors = np.cumsum(~correct[order]) / np.arange(1, len(order) + 1)
    at = np.unique(np.linspace(0, len(order) - 1, points).round().astype(int))
    return {"coverage": ((at + 1) / len(order)).round(4).tolist(), "risk": errors[at].round(5).tolist()}


def histogram(scores_in: np.ndarray, scores_out: np.ndarray, bins: int = 30) -> dict:
    """Counts of in-scope and out-of-scope scores over shared bin edges (the report's histograms)."""
    both = np.r_[scores_in, scores_out]
    edges = np.histogram_bin_edges(both, bins)
    return {"edges": edges.round(5).tolist(), "in": np.histogram(scores_in, edges)[0].tolist(),
            "out": np.histogram(scores_out, edges)[0].tolist()}
