"""Tokenise once, pad per batch: batches are as long as their longest text, never max_length.

Training batches come from transformers' LengthGroupedSampler (similar lengths together, random
order); evaluation and prediction sort by length, so padding is almost nothing.
"""

from __future__ import annotations

import torch


def encode(texts, tokenizer, max_length: int) -> list[list[int]]:
    """Token ids per text, truncated; no padding (that happens per batch)."""
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def collate(input_ids: list[list[int]], pad_id: int, labels: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a list of id lists into a batch with its attention mask."""
    width = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for i, row in enumerate(input_ids):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    return batch


class TrainSet(torch.utils.data.Dataset):
    """(ids, label) pairs; the collate function pads them."""

    def __init__(self, input_ids: list[list[int]], labels: list[int], pad_id: int):
        self.input_ids, self.labels, self.pad_id = input_ids, labels, pad_id

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.input_ids[i], self.labels[i]

    def collate(self, items):
        return collate([x for x, _ in items], self.pad_id, [y for _, y in items])


def length_sorted_batches(input_ids: list[list[int]], batch_size: int):
    """Yield (original indices, batch ids) in order of length: minimal padding for inference."""
    order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, [input_ids[i] for i in idx]
