"""The serve micro-batcher: concurrent requests share model calls, per adapter, cut at max_batch_texts
and never inside a request; a failing call fails only its own requests."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from peftlab.labels import LabelMap
from peftlab.microbatch import Batcher


class Recording:
    """A predictor that records each model call's texts; the text 'boom' fails its call."""

    def __init__(self, gate: threading.Event | None = None):
        self.labels, self.calls, self.gate = LabelMap(["short", "long"]), [], gate

    def logits(self, texts):
        if self.gate is not None:
            self.gate.wait(5)  # hold the model thread: later requests queue up meanwhile
        self.calls.append(list(texts))
        if "boom" in texts:
            raise RuntimeError("model failed")
        return np.array([[1.0, 0.0] if len(t) < 4 else [0.0, 1.0] for t in texts], dtype=np.float32)

    def outputs(self, texts):  # no out-of-scope scorer: no features
        return self.logits(texts), None

    confidence = None


def test_requests_that_queue_up_share_a_call_per_adapter_cut_at_the_limit():
    gate = threading.Event()
    a, b = Recording(gate), Recording()
    batcher = Batcher({"a": a, "b": b}, max_batch_texts=4, max_wait_ms=0)

    async def scenario():
        first = asyncio.ensure_future(batcher.classify("a", ["x"], 1))  # occupies the model thread
        await asyncio.sleep(0.05)
        later = [asyncio.ensure_future(batcher.classify(name, texts, 1)) for name, texts in
                 (("a", ["hi", "hello"]), ("b", ["yo"]), ("a", ["abc", "abcd"]), ("a", ["s"]))]
        await asyncio.sleep(0.05)
        gate.set()
        return await first, await asyncio.gather(*later)

    first, later = asyncio.run(scenario())
    batcher.close()
    assert [r["top_k"] for r in first] == [[("short", pytest.approx(1 / (1 + np.exp(-1))))]]
    assert first[0]["in_scope"] is True and first[0]["ood_score"] is None  # no scorer: nothing rejected
    assert [r["label"] for r in later[0]] == ["short", "long"] and later[1][0]["label"] == "short"
    # a: the first alone, then 2 + 2 texts (4, the limit), then the last request: never split inside one
    assert a.calls == [["x"], ["hi", "hello", "abc", "abcd"], ["s"]] and b.calls == [["yo"]]
    assert batcher.per_adapter["a"] == {"requests": 4, "texts": 6, "batches": 3, "largest_batch_texts": 4}
    assert batcher.totals["batches"] == 4 and batcher.totals["requests"] == 5


def test_a_failing_call_fails_its_requests_only():
    batcher = Batcher({"a": Recording()}, max_batch_texts=8, max_wait_ms=0)

    async def scenario():
        with pytest.raises(RuntimeError, match="model failed"):
            await batcher.classify("a", ["boom"], 1)
        return await batcher.classify("a", ["fine text"], 2)

    result = asyncio.run(scenario())
    batcher.close()
    assert [name for name, _ in result[0]["top_k"]] == ["long", "short"]
    assert batcher.totals["requests"] == 1  # the failed call is not counted as served
