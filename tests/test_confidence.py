"""Calibration and out-of-scope rejection: the numbers on synthetic scores, the open-intent and
out-of-scope-label data splits, and one decision everywhere — predict, the CLI, exports and serve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_overrides
from scipy.special import softmax

import peftlab
from peftlab import cli, confidence, config, data
from peftlab.metrics import calibration, rejection


def test_temperature_scaling_undoes_overconfidence_and_lowers_ece():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 5)) * 2
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    y = np.array([rng.choice(5, p=row) for row in p])
    t = confidence.fit_temperature(3 * z, y)  # a model three times too sure of itself
    assert 2.6 < t < 3.4
    conf = confidence.Confidence(temperature=t)
    before = calibration(softmax(3 * z, axis=-1), y)["ece"]
    after = calibration(conf.probabilities(3 * z), y)["ece"]
    assert after < 0.03 < before


def test_rejection_metrics_on_separable_and_on_random_scores():
    correct = np.ones(100, dtype=bool)
    perfect = rejection(np.linspace(1, 2, 100), np.linspace(-2, 0, 50), 0.5, correct)
    assert perfect["auroc"] == 1.0 and perfect["fpr_at_95"] == 0.0 and perfect["oos_f1"] == 1.0
    assert perfect["in_scope_accuracy"] == 1.0 and perfect["overall_accuracy"] == 1.0
    rng = np.random.default_rng(1)
    noise = rejection(rng.random(2000), rng.random(2000), 0.5, np.ones(2000, dtype=bool))
    assert 0.45 < noise["auroc"] < 0.55 and noise["fpr_at_95"] > 0.9
    assert abs(noise["in_scope_kept"] - 0.5) < 0.05


def test_threshold_keeps_the_asked_fraction_or_maximises_f1_on_validation():
    scores = np.arange(1000, dtype=float)
    t, how = confidence.choose_threshold(scores, np.zeros(0), 0.95)
    assert (scores >= t).mean() == pytest.approx(0.95, abs=0.002) and "keeps 0.95" in how
    t, how = confidence.choose_threshold(np.linspace(5, 6, 200), np.linspace(0, 4, 200), 0.95)
    assert 4 < t <= 5 and "(1.000)" in how


def _cfg(small_data, **data_keys) -> config.DataConfig:
    return config.from_dict({"data": {"train_file": str(small_data["train"]), "test_file": str(small_data["test"]),
                                      "label_column": "category", "validation_size": 30, **data_keys}}).data


def test_known_intents_trains_on_a_seeded_fraction_and_holds_the_rest_out(small_data):
    s = data.load(_cfg(small_data, known_intents=0.5), seed=0)
    all_intents = set(pd.read_csv(small_data["train"]).category)
    known, held = set(s.labels.names), set(s.oos["test"].label)
    assert len(known) == 3 and held == all_intents - known
    assert set(s.train.label) == known and set(s.validation.label) <= known and set(s.test.label) == known
    assert set(s.oos["validation"].label) <= held and len(s.oos["validation"]) > 0
    assert s.sizes()["test_out_of_scope"] == len(s.oos["test"]) == 30
    assert set(data.load(_cfg(small_data, known_intents=0.5), seed=0).labels.names) == known  # seeded
    assert any(set(data.load(_cfg(small_data, known_intents=0.5), seed=k).labels.names) != known for k in (1, 2, 3))


def test_oos_label_is_left_out_of_training_or_trained_as_a_class(small_data, tmp_path):
    frames = {}
    for split in ("train", "test"):
        df = pd.read_csv(small_data[split])
        first = sorted(df.category.unique())[0]
        df.loc[df.category == first, "category"] = "oos"
        frames[split] = tmp_path / f"{split}.csv"
        df.to_csv(frames[split], index=False)
    threshold = data.load(_cfg(frames, oos_label="oos"), seed=0)
    assert "oos" not in threshold.labels.names and "oos" not in set(threshold.train.label)
    assert len(threshold.labels) == 5 and set(threshold.oos["test"].label) == {"oos"}
    as_class = data.load(_cfg(frames, oos_label="oos", oos_train="class"), seed=0)
    assert "oos" in as_class.labels.names and "oos" in set(as_class.train.label)
    assert "oos" not in set(as_class.test.label) and len(as_class.oos["test"]) == 10


@pytest.fixture(scope="module")
def open_intent_runs(tmp_path_factory, tiny_model, small_data) -> Path:
    """Two tiny runs on half the intents, the same but for ood.method: mahalanobis, and none."""
    out = tmp_path_factory.mktemp("ood")
    for method in ("mahalanobis", "none"):
        over = tiny_overrides(tiny_model, small_data, out, "lora", run_name=method,
                              **{"data.known_intents": 0.5, "ood.method": method, "train.epochs": 3})
        assert cli.main(["train", *over]) == 0
    return out


def test_rejection_changes_nothing_of_training_and_is_in_the_summary(open_intent_runs):
    on = json.loads((open_intent_runs / "mahalanobis" / "summary.json").read_text())
    off = json.loads((open_intent_runs / "none" / "summary.json").read_text())
    assert on["test_accuracy"] == off["test_accuracy"] and on["test_loss"] == off["test_loss"]
    weights = "adapter/adapter_model.safetensors"
    assert (open_intent_runs / "mahalanobis" / weights).read_bytes() == (open_intent_runs / "none" / weights).read_bytes()
    r = on["rejection"]
    assert r["method"] == "mahalanobis" and r["test_out_of_scope"] == 30
    assert list(r["scorers"]) == ["softmax", "msp", "energy", "mahalanobis", "knn"]  # softmax: the baseline
    for figures in r["scorers"].values():
        assert 0 <= figures["auroc"] <= 1 and "validation" in figures["selected_by"]
    # with the threshold at -inf nothing is rejected: in-scope accuracy is the closed-set test accuracy
    conf = confidence.Confidence.load(open_intent_runs / "mahalanobis")
    assert conf.means is not None and conf.bank is None and conf.threshold == r["threshold"]
    assert off["rejection"]["method"] == "none" and confidence.Confidence.load(open_intent_runs / "none").rejects is False
    assert on["calibration"]["temperature"] > 0 and "ece_after" in on["calibration"]


def test_predict_exports_and_serve_reject_the_same_texts(open_intent_runs, small_data, tmp_path):
    run = open_intent_runs / "mahalanobis"
    texts = [*pd.read_csv(small_data["test"]).text.tolist()[:40], "", "🙂🙂🙂", "x" * 1500]
    ours = peftlab.predict(run, texts)
    decisions = [r["in_scope"] for r in ours]
    assert 0 < sum(decisions) < len(texts)  # the tiny model rejects some, keeps some
    assert all(r["label"] == "out_of_scope" for r in ours if not r["in_scope"])
    assert all(r["label"] == r["top_k"][0][0] for r in ours if r["in_scope"])
    for fmt in ("adapter", "merged", "onnx"):
        folder = peftlab.export(run, fmt, tmp_path / fmt)
        got = peftlab.predict(folder, texts)
        assert [r["in_scope"] for r in got] == decisions, fmt
        assert np.allclose([r["ood_score"] for r in got], [r["ood_score"] for r in ours], rtol=1e-3), fmt
        assert json.loads((folder / "export.json").read_text())["parity"]["decision_agreement"] == 1.0
    # a per-request threshold: everything in, everything out
    assert all(r["in_scope"] for r in peftlab.predict(run, texts, threshold=-1e12))
    assert not any(r["in_scope"] for r in peftlab.predict(run, texts, threshold=-1e-9))

    from fastapi.testclient import TestClient

    from peftlab.server import create_app

    with TestClient(create_app({"a": run})) as client:
        body = client.post("/v1/classify", json={"texts": texts}).json()
        assert [r["in_scope"] for r in body["results"]] == decisions
        assert [r["label"] for r in body["results"]] == [r["label"] for r in ours]
        low = client.post("/v1/classify", json={"texts": texts, "threshold": -1e12}).json()
        assert all(r["in_scope"] for r in low["results"])
        info = client.get("/v1/adapters").json()["adapters"][0]
        assert info["ood_method"] == "mahalanobis" and info["ood_threshold"] == pytest.approx(
            confidence.Confidence.load(run).threshold)

    pd.DataFrame({"text": texts}).to_csv(tmp_path / "in.csv", index=False)
    assert cli.main(["predict", str(run), str(tmp_path / "in.csv"), "-o", str(tmp_path / "out.csv")]) == 0
    csv = pd.read_csv(tmp_path / "out.csv")
    assert list(csv.columns) == ["id", "label", "score", "in_scope", "ood_score"]
    assert csv.in_scope.tolist() == decisions


def test_evaluate_reports_rejection_on_the_runs_own_out_of_scope_texts(open_intent_runs):
    m = peftlab.evaluate(open_intent_runs / "mahalanobis")
    s = json.loads((open_intent_runs / "mahalanobis" / "summary.json").read_text())
    assert m["accuracy"] == pytest.approx(s["test_accuracy"]) and m["out_of_scope_examples"] == 30
    got, want = m["confidence"]["rejection"], s["rejection"]["scorers"]["mahalanobis"]
    assert got["auroc"] == pytest.approx(want["auroc"]) and got["oos_f1"] == pytest.approx(want["oos_f1"])
    assert m["confidence"]["ece"] == pytest.approx(s["calibration"]["ece_after"])


def test_an_out_of_scope_class_rejects_what_it_predicts(tiny_model, small_data, tmp_path):
    frames = {}
    for split in ("train", "test"):
        df = pd.read_csv(small_data[split])
        df.loc[df.category == sorted(df.category.unique())[0], "category"] = "oos"
        frames[split] = tmp_path / f"{split}.csv"
        df.to_csv(frames[split], index=False)
    over = tiny_overrides(tiny_model, frames, tmp_path / "runs", "lora", run_name="class",
                          **{"data.oos_label": "oos", "data.oos_train": "class", "train.epochs": 1})
    assert cli.main(["train", *over]) == 0
    run = tmp_path / "runs" / "class"
    conf = confidence.Confidence.load(run)
    names = json.loads((run / "labels.json").read_text())["id2label"]
    assert conf.method == "none" and names[str(conf.oos_class)] == "oos" and conf.rejects
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rejection"]["test_out_of_scope"] == 10 and summary["splits"]["test"] == 50
    records = peftlab.predict(run, pd.read_csv(frames["test"]).text.tolist(), top_k=6)
    assert all(r["in_scope"] == (r["top_k"][0][0] != "oos") for r in records)
