"""Micro-batching for serve: requests that arrive together share one model call.

All model calls run on ONE thread (a single-thread executor): adapters on one shared base model switch
before each batch, which two threads would race on. One asyncio worker takes every request that queued up
while the previous batch ran (optionally waiting ``max_wait_ms`` for more), groups them per adapter and runs
one model call per group of up to ``max_batch_texts``: concurrent clients share a forward pass instead of
queueing for one each. Counters per adapter say how well it works (batches < requests: requests combined).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .predictor import results

log = logging.getLogger("peftlab")


@dataclass
class _Job:
    adapter: str
    texts: list[str]
    top_k: int
    threshold: float | None
    future: asyncio.Future


def _new_counters() -> dict[str, int]:
    # batches counts model calls: fewer batches than requests means requests were combined
    return {"requests": 0, "texts": 0, "batches": 0, "largest_batch_texts": 0}


def _classify(predictor, jobs: list[_Job]) -> list[list[dict]]:
    """Runs on the model thread: one model call for all texts of ``jobs``, then each job's records
    (``predictor.results``: top-k, calibrated scores, out-of-scope decision at the job's threshold)."""
    logits, features = predictor.outputs([t for job in jobs for t in job.texts])
    out, start = [], 0
    for job in jobs:
        rows = slice(start, start + len(job.texts))
        out.append(results(predictor, logits[rows], None if features is None else features[rows], job.top_k,
                           job.threshold))
        start += len(job.texts)
    return out


class Batcher:
    """Collects jobs on the event loop; runs them, grouped per adapter, on one model thread."""

    def __init__(self, predictors: dict[str, Any], max_batch_texts: int, max_wait_ms: float):
        self.predictors, self.max_batch_texts, self.max_wait_ms = predictors, max_batch_texts, max_wait_ms
        self.totals = _new_counters()
        self.per_adapter = {name: _new_counters() for name in predictors}
        self._executor = self._loop = self._task = None

    def _ensure_worker(self) -> None:
        # Started lazily on the running loop: a test client without lifespan, or one loop per request
        # (TestClient outside a `with`), still gets a worker on the loop that awaits the results. Each
        # worker owns its queue, so a worker left on an old loop never touches another loop's futures.
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="peftlab-model")
        if self._loop is not loop or self._task is None or self._task.done():
            if self._task is not None and not self._task.done() and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._task.cancel)
            self._loop, self._pending, self._wakeup = loop, deque(), asyncio.Event()
            self._task = loop.create_task(self._work(self._pending, self._wakeup))

    async def classify(self, adapter: str, texts: list[str], top_k: int, threshold: float | None = None):
        """Each text's record (``predictor.results``), computed in a batch shared with concurrent requests."""
        self._ensure_worker()
        job = _Job(adapter, texts, top_k, threshold, self._loop.create_future())
        self._pending.append(job)
        self._wakeup.set()
        return await job.future

    async def _work(self, pending: deque[_Job], wakeup: asyncio.Event) -> None:
        loop, wait_s, full = asyncio.get_running_loop(), self.max_wait_ms / 1000, self.max_batch_texts
        while True:
            while not pending:
                wakeup.clear()
                await wakeup.wait()
            # Collection window: wait for company until the window closes or a batch is full. Requests
            # that arrive while the model is busy queue up and go together into the next batch anyway.
            deadline = loop.time() + wait_s
            while sum(len(j.texts) for j in pending) < full and (left := deadline - loop.time()) > 0:
                wakeup.clear()
                try:
                    await asyncio.wait_for(wakeup.wait(), left)
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    break
            jobs = [j for j in pending if not j.future.done()]  # done: the client went away
            pending.clear()
            groups: dict[str, list[_Job]] = {}  # per adapter, in order of first arrival
            for job in jobs:
                groups.setdefault(job.adapter, []).append(job)
            for group in groups.values():
                chunk, size = [], 0
                for job in group:  # cut at max_batch_texts, never inside a request
                    if chunk and size + len(job.texts) > full:
                        await self._run(chunk)
                        chunk, size = [], 0
                    chunk.append(job)
                    size += len(job.texts)
                await self._run(chunk)

    async def _run(self, chunk: list[_Job]) -> None:
        name = chunk[0].adapter
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, _classify, self.predictors[name], chunk)
        except Exception as e:  # a model failure fails this chunk's requests, never the worker
            log.exception("serve: model call for adapter %r failed", name)
            for job in chunk:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        n = sum(len(j.texts) for j in chunk)
        for c in (self.totals, self.per_adapter[name]):
            c["requests"] += len(chunk)
            c["texts"] += n
            c["batches"] += 1
            c["largest_batch_texts"] = max(c["largest_batch_texts"], n)
        for job, result in zip(chunk, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._task = None
