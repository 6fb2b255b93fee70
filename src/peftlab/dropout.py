"""FastDropout: nn.Dropout's distribution with the mask drawn by torch.rand, swapped in for training only.

On CPU, bernoulli_ took 15 % of a LoRA training step of MiniLM at batch 16 (profile), twice the time of
rand. Each element is kept with probability 1 - p and scaled by 1 / (1 - p), as in nn.Dropout; only the
random stream differs (``train.fast_dropout: false`` keeps nn.Dropout's own masks).
"""

from __future__ import annotations

import contextlib

import torch


class _KeepMask(torch.autograd.Function):
    """x * keep / (1 - p) with keep ~ Bernoulli(1 - p) drawn as rand >= p; saves the boolean mask only."""

    @staticmethod
    def forward(ctx, x, p: float):
        keep = torch.rand_like(x) >= p
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None


class FastDropout(torch.nn.Dropout):
    """nn.Dropout with the mask drawn by torch.rand (see the module docstring)."""

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        return _KeepMask.apply(x, self.p)


@contextlib.contextmanager
def fast_dropout(model, enabled: bool = True):
    """Swap every nn.Dropout in ``model`` for FastDropout, and back on exit (exports, serving and reloads
    see the model's own modules). Attention dropout inside SDPA is the kernel's and stays as it is."""
    swapped = []
    if enabled:
        for parent in model.modules():
            for name, child in parent.named_children():
                if type(child) is torch.nn.Dropout and child.p > 0:
                    setattr(parent, name, FastDropout(child.p, child.inplace))
                    swapped.append((parent, name, child))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
