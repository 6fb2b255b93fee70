"""Prediction: logits in the caller's order whatever the batching, top-k with ties and caps, and adapters
sharing one base model that each still answer as when loaded alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax

from peftlab import predictor
from peftlab.labels import LabelMap
from peftlab.predictor import Predictor, predict_logits, top_labels


class Lengths(torch.nn.Module):
    """A 'model' whose logits are each text's length and first id: order and padding are visible."""

    config = type("Config", (), {"num_labels": 2})()

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.batch_widths = []

    def forward(self, input_ids, attention_mask):
        self.batch_widths.append(input_ids.shape[1])
        out = torch.stack([attention_mask.sum(1).float(), input_ids[:, 0].float()], 1)
        return type("Out", (), {"logits": out + self.w})()


def test_predict_logits_keeps_the_callers_order_pads_per_batch_and_restores_training_mode():
    ids = [[5] * n for n in (7, 1, 4, 9, 2, 3)]
    model = Lengths().train()
    out = predict_logits(model, ids, pad_id=0, batch_size=2)
    assert out[:, 0].tolist() == [7, 1, 4, 9, 2, 3] and (out[:, 1] == 5).all()
    assert model.batch_widths == [2, 4, 9]  # length-sorted: (1, 2), (3, 4), (7, 9)
    assert model.training


def test_top_labels_orders_caps_and_breaks_ties_by_id():
    labels = LabelMap(["a", "b", "c"])
    got = top_labels(softmax(np.array([[0.0, 2.0, 2.0], [1.0, 0.0, 0.0]]), axis=-1), labels, top_k=5)
    assert [name for name, _ in got[0]] == ["b", "c", "a"] and [name for name, _ in got[1]] == ["a", "b", "c"]
    assert got[0][0][1] == pytest.approx(np.exp(2) / (2 * np.exp(2) + 1)) and got[0][0][1] == got[0][1][1]
    assert sum(p for _, p in got[1]) == pytest.approx(1.0)
    assert len(top_labels(np.zeros((1, 3)), labels, top_k=0)[0]) == 1


def test_an_onnx_kind_predictor_keeps_the_order():
    class Session:
        def run(self, names, feeds):
            return [np.stack([feeds["attention_mask"].sum(1), feeds["input_ids"][:, 0]], 1).astype(np.float32)]

    class Tokenizer:
        pad_token_id = 0

        def __call__(self, texts, truncation, max_length):
            return {"input_ids": [[len(t)] * len(t) for t in texts]}

    p = Predictor(Session(), Tokenizer(), LabelMap(["x", "y"]), 16, kind="onnx")
    assert p.logits(["abc", "a", "abcdef", "ab"], batch_size=3)[:, 0].tolist() == [3, 1, 6, 2]


def test_adapters_on_one_backbone_share_a_base_and_answer_as_alone(lora_pair):
    texts = ["my card has not arrived", "what is the exchange rate", "I want a refund"]
    alone = {name: predictor.load(lora_pair / name).logits(texts) for name in ("alpha", "beta")}
    shared = predictor.load_many({"alpha": lora_pair / "alpha", "beta": lora_pair / "beta"})
    assert shared["alpha"].model is shared["beta"].model
    for name in ("beta", "alpha", "beta"):  # switching back and forth
        assert np.allclose(shared[name].logits(texts), alone[name], atol=1e-6), name
    assert not np.allclose(alone["alpha"], alone["beta"])  # two different adapters
