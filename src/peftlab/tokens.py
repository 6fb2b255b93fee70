"""Tokens: tokenise once, pad per batch — batches are as long as their longest text, never max_length.

Training batches come from transformers' LengthGroupedSampler (similar lengths together, random
order); evaluation and prediction sort by length, so padding is almost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Texts tokenised per call: the tokenizer returns Python lists (~36 bytes a token), so a whole 100k-row
# dataset at once would hold them all; chunks keep that to one chunk's worth.
ENCODE_CHUNK = 4096


class Tokens(Sequence):
    """Token ids of many texts in one flat int32 array with offsets: 4 bytes a token instead of ~36 for
    lists of Python ints. ``tokens[i]`` is text i's ids (a numpy view)."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    @classmethod
    def from_lists(cls, rows) -> Tokens:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
        return cls(flat, offsets)

    @classmethod
    def concat(cls, parts: list[Tokens]) -> Tokens:
        if not parts:
            return cls(np.zeros(0, dtype=np.int32), np.zeros(1, dtype=np.int64))
        starts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        offsets = np.concatenate([parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, starts, strict=True)])
        return cls(np.concatenate([p.flat for p in parts]), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def __add__(self, other) -> Tokens:
        return Tokens.concat([self, other if isinstance(other, Tokens) else Tokens.from_lists(other)])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def encode(texts, tokenizer, max_length: int) -> Tokens:
    """Token ids per text, truncated; no padding (that happens per batch)."""
    texts = list(texts)
    return Tokens.concat([
        Tokens.from_lists(tokenizer(texts[i : i + ENCODE_CHUNK], truncation=True, max_length=max_length)["input_ids"])
        for i in range(0, len(texts), ENCODE_CHUNK)])


def collate(input_ids, pad_id: int, labels: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad id rows (lists or arrays) into a batch with its attention mask."""
    width = max(len(x) for x in input_ids)
    ids = np.full((len(input_ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(input_ids), width), dtype=np.int64)
    for i, row in enumerate(input_ids):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if labels is not None:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    return batch


class Examples(torch.utils.data.Dataset):
    """Labelled texts as (ids, label) pairs: the training, validation and extra-epoch sets. The collate
    function pads a batch of them."""

    def __init__(self, input_ids: Tokens | list[list[int]], labels: list[int], pad_id: int):
        self.input_ids, self.labels, self.pad_id = input_ids, labels, pad_id

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.input_ids[i], self.labels[i]

    def collate(self, items):
        return collate([x for x, _ in items], self.pad_id, [y for _, y in items])


def lengths(input_ids) -> list[int]:
    """Token count of each text, for Tokens or plain lists of ids."""
    return input_ids.lengths().tolist() if isinstance(input_ids, Tokens) else [len(x) for x in input_ids]


def length_sorted_batches(input_ids, batch_size: int):
    """Yield (original indices, batch ids) in order of length: minimal padding for inference."""
    order = sorted(range(len(input_ids)), key=lengths(input_ids).__getitem__)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, [input_ids[i] for i in idx]
