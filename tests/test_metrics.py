"""Metrics from logits, against figures worked out by hand."""

from __future__ import annotations

import math

import numpy as np

from peftlab.metrics import metrics


def test_accuracy_macro_f1_loss_per_class_and_confusion():
    # 3 classes; truth 0,0,1,2; predicted 0,1,1,1 (class 2 is never predicted).
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 0.0], [0.0, 1.0, 0.5]], dtype=np.float32)
    m = metrics(logits, [0, 0, 1, 2], ["a", "b", "c"], per_class=True)
    assert m["accuracy"] == 0.5 and m["examples"] == 4
    # F1 per class: a 2·1·0.5/1.5 = 2/3; b precision 1/3, recall 1 → 0.5; c 0 (zero_division=0).
    assert math.isclose(m["f1"], (2 / 3 + 0.5 + 0) / 3)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert math.isclose(m["loss"], -np.mean([logp[0, 0], logp[1, 0], logp[2, 1], logp[3, 2]]), rel_tol=1e-6)
    assert m["per_class"]["b"] == {"precision": 1 / 3, "recall": 1.0, "f1-score": 0.5, "support": 1}
    assert m["per_class"]["c"]["f1-score"] == 0.0
    assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]  # rows: true, columns: predicted


def test_a_class_absent_from_the_labels_still_counts_in_macro_f1():
    logits = np.eye(3, dtype=np.float32)[[0, 1]]  # two examples, three classes
    m = metrics(logits, [0, 1])
    assert m["accuracy"] == 1.0 and math.isclose(m["f1"], 2 / 3)  # the absent class scores 0, like sklearn's
    assert "per_class" not in m and "confusion" not in m
