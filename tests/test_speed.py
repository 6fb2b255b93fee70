"""Speed measures that must not change what is learned: FastDropout has nn.Dropout's distribution and
gradient, and is swapped out again after training."""

from __future__ import annotations

import torch

from peftlab.dropout import FastDropout, fast_dropout


def test_fast_dropout_matches_dropout_in_distribution_and_gradient():
    torch.manual_seed(0)
    d = FastDropout(0.1)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = d(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.003  # 1e6 draws: std 0.0003
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.9))  # kept values scaled as nn.Dropout does
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * mask * s)/dx = mask * s
    d.eval()
    assert d(x) is x
    assert FastDropout(0.0)(x) is x


def test_fast_dropout_swaps_and_restores(tiny_model):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3),
                           LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["query", "value"],
                                      lora_dropout=0.1))
    before = [type(m) for m in model.modules()]
    with fast_dropout(model) as n:
        # 2 layers x (attention probs, attention output, feed-forward output, LoRA on query and value)
        # + embeddings + classifier head
        assert n == 2 * 5 + 2
        assert sum(type(m) is FastDropout for m in model.modules()) == n
        model.train()
        batch = {"input_ids": torch.tensor([[101, 2000, 102]]), "labels": torch.tensor([1])}
        model(**batch).loss.backward()
    assert [type(m) for m in model.modules()] == before
    with fast_dropout(model, enabled=False) as n:
        assert n == 0
