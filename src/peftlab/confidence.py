"""Confidence: calibrated probabilities and out-of-scope rejection, fitted after training at no training cost.

Temperature scaling (Guo et al., 2017) divides the logits by one number fitted on validation (NLL), so
that a score of 0.8 is right about 80 % of the time. Four scores say how in-scope a text is (higher: more):

    msp          the calibrated top softmax probability (Hendrycks & Gimpel, 2017; the summary also
                 reports the uncalibrated one, ``softmax``, as the baseline)
    energy       logsumexp of the logits (Liu et al., 2020)
    mahalanobis  minus the smallest Mahalanobis distance of the pooled features (the input of the head's
                 output layer) to a class mean, with one shared covariance (Podolskiy et al., 2021)
    knn          cosine similarity of the normalised features to the k-th nearest training text (Sun et al., 2022)

A threshold on the deciding score, chosen on validation only (``choose_threshold``), rejects. Everything a
decision needs is a ``Confidence``: saved in the run as confidence.json (+ confidence.safetensors with the
class means, the precision matrix and the training features for knn) and copied into every export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, softmax
from sklearn.covariance import LedoitWolf
from sklearn.metrics import f1_score
from sklearn.neighbors import NearestNeighbors

from .config import OOD_SCORERS
from .errors import RunError
from .files import read_json, write_json, write_safetensors
from .metrics import calibration, histogram, rejection, risk_coverage

FILE = "confidence.json"
TENSORS = "confidence.safetensors"
FEATURE_SCORERS = ("mahalanobis", "knn")  # the ones that need the pooled features and training statistics
# What the summary and the report compare: every scorer, after the uncalibrated softmax as the baseline.
REPORTED = ("softmax", *OOD_SCORERS)


def fit_temperature(logits: np.ndarray, labels) -> float:
    """The temperature T > 0 that minimises the validation NLL of softmax(logits / T)."""
    z = torch.from_numpy(logits).double()
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(z / np.exp(log_t), y))

    return float(np.exp(minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded").x))


@dataclass
class Confidence:
    """Temperature, the deciding scorer and its threshold, and the statistics the feature scorers need."""

    temperature: float = 1.0
    method: str = "none"  # the deciding scorer, or "none": nothing is rejected
    threshold: float | None = None
    label: str = "out_of_scope"  # what predict and serve call a rejected text
    oos_class: int | None = None  # data.oos_train class: predicting this label id rejects too
    knn_k: int = 10
    means: np.ndarray | None = None  # (classes, features)
    precision: np.ndarray | None = None  # (features, features), the inverse shared covariance
    bank: np.ndarray | None = None  # (training texts, features), L2-normalised
    record: dict = field(default_factory=dict)  # how it was fitted (shown by info, kept with exports)
    _nn: NearestNeighbors | None = field(default=None, repr=False)

    @property
    def needs_features(self) -> bool:
        return self.method in FEATURE_SCORERS

    @property
    def rejects(self) -> bool:
        return self.method != "none" or self.oos_class is not None

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits / self.temperature, axis=-1)

    def score(self, method: str, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """In-scope score of each text under ``method`` (higher: more in scope)."""
        if method == "msp":
            return self.probabilities(logits).max(-1)
        if method == "softmax":  # the uncalibrated top probability: reported as the baseline, never decides
            return softmax(logits, axis=-1).max(-1)
        if method == "energy":
            return logsumexp(logits, axis=-1)
        if features is None:
            raise RunError(f"the {method} score needs the pooled features of each text")
        if method == "mahalanobis":
            if self.means is None:
                raise RunError("this model has no class statistics for the mahalanobis score; retrain with "
                               "ood.method mahalanobis")
            x = features.astype(np.float64)
            left = x @ self.precision  # d(x, m)² = x'Px - 2 x'Pm + m'Pm, for every class mean m at once
            d2 = (left * x).sum(-1)[:, None] - 2 * left @ self.means.T + ((self.means @ self.precision) * self.means).sum(-1)
            return -d2.min(-1)
        if method == "knn":
            if self.bank is None:
                raise RunError("this model has no training features for the knn score; retrain with ood.method knn")
            if self._nn is None:
                self._nn = NearestNeighbors(n_neighbors=min(self.knn_k, len(self.bank)), metric="cosine",
                                            algorithm="brute").fit(self.bank)
            distances = self._nn.kneighbors(features.astype(np.float32), return_distance=True)[0]
            return 1 - distances[:, -1]
        raise RunError(f"unknown out-of-scope score {method!r} (use one of {', '.join(OOD_SCORERS)})")

    def decide(self, logits: np.ndarray, features: np.ndarray | None = None,
               threshold: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(in_scope flags, deciding scores or None) for each text; ``threshold`` overrides the saved one."""
        accepted = np.ones(len(logits), dtype=bool)
        if self.oos_class is not None:
            accepted &= logits.argmax(-1) != self.oos_class
        if self.method == "none":
            return accepted, None
        scores = self.score(self.method, logits, features)
        cut = self.threshold if threshold is None else threshold
        return accepted & (scores >= cut), scores

    def save(self, folder: Path) -> None:
        tensors = {k: torch.from_numpy(getattr(self, k).astype(np.float32)) for k in ("means", "precision", "bank")
                   if getattr(self, k) is not None}
        if tensors:
            write_safetensors(folder / TENSORS, tensors)
        write_json(folder / FILE, {"temperature": self.temperature, "method": self.method, "threshold": self.threshold,
                                   "label": self.label, "oos_class": self.oos_class, "knn_k": self.knn_k,
                                   "tensors": sorted(tensors), **self.record})

    @classmethod
    def load(cls, folder: Path) -> Confidence | None:
        """The confidence saved in a run or export folder, or None (a model trained before it existed)."""
        if not (folder / FILE).is_file():
            return None
        raw = read_json(folder / FILE)
        tensors = load_file(str(folder / TENSORS)) if raw.get("tensors") else {}
        known = {"temperature", "method", "threshold", "label", "oos_class", "knn_k", "tensors"}
        return cls(raw["temperature"], raw["method"], raw["threshold"], raw["label"], raw["oos_class"], raw["knn_k"],
                   **{k: tensors[k].astype(np.float64 if k != "bank" else np.float32) for k in tensors},
                   record={k: v for k, v in raw.items() if k not in known})


def fit_statistics(conf: Confidence, features: np.ndarray, labels, num_labels: int) -> None:
    """Class means and the shared (Ledoit-Wolf shrunk) covariance of the training features, and the
    normalised features themselves for knn."""
    y = np.asarray(labels)
    x = features.astype(np.float64)
    conf.means = np.stack([x[y == c].mean(0) if (y == c).any() else x.mean(0) for c in range(num_labels)])
    conf.precision = LedoitWolf(assume_centered=True).fit(x - conf.means[y]).precision_
    conf.bank = (features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)).astype(np.float32)
    conf._nn = None


def choose_threshold(scores_in: np.ndarray, scores_out: np.ndarray, keep_in_scope: float,
                     rejected_in: np.ndarray | None = None, rejected_out: np.ndarray | None = None
                     ) -> tuple[float, str]:
    """(threshold, how it was chosen), on validation only: with out-of-scope validation texts, the threshold
    of best out-of-scope F1 (over every distinct score); else the one that keeps ``keep_in_scope`` of the
    in-scope texts."""
    if len(scores_out) == 0:
        return float(np.quantile(scores_in, 1 - keep_in_scope, method="lower")), \
            f"keeps {keep_in_scope:g} of in-scope validation texts"
    both = np.r_[scores_in, scores_out]
    truth = np.r_[np.zeros(len(scores_in), bool), np.ones(len(scores_out), bool)]
    other = None if rejected_in is None else np.r_[rejected_in, rejected_out]
    candidates = np.unique(np.quantile(both, np.linspace(0, 1, 401)))
    best, best_f1 = candidates[0], -1.0
    for t in candidates:
        rejected = both < t if other is None else (both < t) | other
        f = f1_score(truth, rejected, zero_division=0)
        if f > best_f1:
            best, best_f1 = t, f
    return float(best), f"best out-of-scope F1 on validation ({best_f1:.3f})"


@dataclass
class Outputs:
    """A split's logits, pooled features (or None) and label ids (in-scope texts; -1 for out-of-scope ones)."""

    logits: np.ndarray
    features: np.ndarray | None
    labels: np.ndarray

    def take(self, rows: np.ndarray) -> Outputs:
        return Outputs(self.logits[rows], None if self.features is None else self.features[rows], self.labels[rows])


def _scores(conf: Confidence, method: str, out: Outputs) -> np.ndarray:
    if len(out.logits) == 0:
        return np.zeros(0)
    return conf.score(method, out.logits, out.features)


def _class_rejects(conf: Confidence, out: Outputs) -> np.ndarray | None:
    return None if conf.oos_class is None else out.logits.argmax(-1) == conf.oos_class


def fit(ood, validation: Outputs, validation_oos: Outputs | None, test: Outputs, test_oos: Outputs | None,
        train: Outputs | None, oos_class: int | None = None) -> tuple[Confidence, dict]:
    """The run's Confidence (``ood`` is the config section) and what summary.json records: calibration
    before/after on test, and, with out-of-scope test texts or a deciding scorer, every scorer's threshold
    (chosen on validation) and test figures. ``train`` (features) enables the feature scorers."""
    conf = Confidence(method=ood.method, label=ood.label, oos_class=oos_class, knn_k=ood.knn_k)
    if ood.calibrate:
        conf.temperature = fit_temperature(validation.logits, validation.labels)
    before = calibration(softmax(test.logits, axis=-1), test.labels)
    after = calibration(conf.probabilities(test.logits), test.labels)
    summary: dict = {"calibration": {
        "temperature": round(conf.temperature, 5), "fitted_on": f"validation ({len(validation.labels)} texts)",
        "ece_before": before["ece"], "ece_after": after["ece"], "brier_before": before["brier"],
        "brier_after": after["brier"], "reliability_before": before["reliability"],
        "reliability_after": after["reliability"]}}
    empty = Outputs(np.zeros((0, test.logits.shape[1]), np.float32), None, np.zeros(0, int))
    validation_oos, test_oos = validation_oos or empty, test_oos or empty
    if train is not None and train.features is not None:
        fit_statistics(conf, train.features, train.labels, test.logits.shape[1])
    if not len(test_oos.labels) and ood.method == "none":
        return _keep_needed(conf), summary
    methods = [m for m in REPORTED if m not in FEATURE_SCORERS or conf.means is not None]
    correct = test.logits.argmax(-1) == test.labels
    table, hists, curves = {}, {}, {}
    for m in methods:
        threshold, how = choose_threshold(_scores(conf, m, validation), _scores(conf, m, validation_oos),
                                          ood.keep_in_scope, _class_rejects(conf, validation),
                                          _class_rejects(conf, validation_oos))
        s_in, s_out = _scores(conf, m, test), _scores(conf, m, test_oos)
        table[m] = {**rejection(s_in, s_out, threshold, correct, _class_rejects(conf, test),
                                _class_rejects(conf, test_oos)), "selected_by": how}
        curves[m] = risk_coverage(s_in, correct)
        if len(s_out):
            hists[m] = histogram(s_in, s_out)
    if ood.method != "none":
        conf.threshold = table[ood.method]["threshold"]
    summary["rejection"] = {"method": ood.method, "label": ood.label, "threshold": conf.threshold,
                            "test_in_scope": len(test.labels), "test_out_of_scope": len(test_oos.labels),
                            "validation_out_of_scope": len(validation_oos.labels),
                            "scorers": table, "histograms": hists, "risk_coverage": curves}
    conf.record = {"fitted": {"temperature_on": summary["calibration"]["fitted_on"],
                              "threshold": table[ood.method]["selected_by"] if ood.method != "none" else None}}
    return _keep_needed(conf), summary


def _keep_needed(conf: Confidence) -> Confidence:
    """Drop the statistics the deciding scorer does not use (a knn bank is the training set's features)."""
    if conf.method != "mahalanobis":
        conf.means = conf.precision = None
    if conf.method != "knn":
        conf.bank = None
    return conf


def evaluate(conf: Confidence, test: Outputs, test_oos: Outputs | None) -> dict:
    """The saved confidence on new labelled texts: calibration, and rejection figures with out-of-scope texts."""
    cal = calibration(conf.probabilities(test.logits), test.labels)
    out: dict = {"temperature": conf.temperature, "ece": cal["ece"], "brier": cal["brier"]}
    if conf.rejects and test_oos is not None and len(test_oos.labels):
        correct = test.logits.argmax(-1) == test.labels
        if conf.method == "none":  # an out-of-scope class only: its predictions reject
            s_in, s_out, threshold = np.ones(len(test.labels)), np.ones(len(test_oos.labels)), 0.0
        else:
            s_in, s_out, threshold = _scores(conf, conf.method, test), _scores(conf, conf.method, test_oos), conf.threshold
        out["rejection"] = {"method": conf.method, **rejection(s_in, s_out, threshold, correct,
                                                               _class_rejects(conf, test), _class_rejects(conf, test_oos))}
    return out
