"""Token storage and batching: a flat array that behaves like the tokenizer's lists, chunked encoding
equal to one call, and padding per batch."""

from __future__ import annotations

import numpy as np
import pandas as pd

from peftlab import tokens
from peftlab.tokens import Tokens, collate, encode, length_sorted_batches


def test_tokens_behave_like_lists():
    rows = [[101, 7, 8, 102], [101, 102], [101, 5, 102]]
    t = Tokens.from_lists(rows)
    assert len(t) == 3 and [list(x) for x in t] == rows and t.lengths().tolist() == [4, 2, 3]
    joined = t + [[1, 2]]  # noqa: RUF005 (Tokens.__add__ under test)
    assert [list(x) for x in joined] == [*rows, [1, 2]]
    assert [list(x) for x in Tokens.concat([t, t])] == rows + rows
    assert t.flat.dtype == np.int32 and t.flat.nbytes == 4 * 9  # 4 bytes a token
    a, b = collate([t[0], t[1]], 0, [3, 4]), collate(rows[:2], 0, [3, 4])
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].tolist() == b[key].tolist()
    assert a["input_ids"].tolist() == [[101, 7, 8, 102], [101, 102, 0, 0]]
    assert a["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    order = [i for idx, _ in length_sorted_batches(t, 2) for i in idx]
    assert order == [1, 2, 0]


def test_chunked_encoding_equals_one_call(monkeypatch, data_dir):
    from transformers import AutoTokenizer

    from peftlab.modeling import resolve_backbone

    tok = AutoTokenizer.from_pretrained(resolve_backbone("default"))
    texts = pd.read_csv(data_dir / "banking77" / "test.csv").text.tolist()[:1000]
    whole = tok(texts, truncation=True, max_length=64)["input_ids"]
    monkeypatch.setattr(tokens, "ENCODE_CHUNK", 97)  # many chunks, the last one short
    chunked = encode(texts, tok, 64)
    assert len(chunked) == len(whole) and all(list(a) == b for a, b in zip(chunked, whole, strict=True))
