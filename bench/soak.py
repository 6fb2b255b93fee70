"""Soak test for `peftlab serve`: minutes of concurrent mixed traffic, malformed requests included.

    python bench/soak.py --run RUN_A --run RUN_B --seconds 300 --concurrency 32

Starts `peftlab serve` on 127.0.0.1 (a free port) with the given runs as adapters, then keeps
--concurrency clients busy for --seconds. Each request is, at random, a valid classification (1–8
Banking77 test texts, a random adapter, top_k 1–3) or — with probability --bad-fraction — one of the
bad requests below, each of which must get its 4xx. Prints requests served, answers by class and
status, p50/p99 latency of the valid requests, and the server's resident memory (RSS) after warm-up,
every --sample-seconds, and at the end. Exit code 1 when any 5xx, connection error or wrong status
was seen. With --json, the summary is also printed as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
from serve import percentile, read_texts, running_server

LIMITS = {"max_texts_per_request": 16, "max_chars_per_text": 1000, "max_body_bytes": 100_000}


def bad_requests(names: list[str]) -> list[tuple[str, dict, int]]:
    """(kind, httpx request arguments, expected status)."""
    good = {"texts": ["where is my card?"], "adapter": names[0]}
    as_json = {"headers": {"content-type": "application/json"}}
    return [
        ("malformed-json", {"content": b'{"texts": ["a"', **as_json}, 422),
        ("not-utf8", {"content": b'{"texts": ["\xff\xfe"]}', **as_json}, 400),
        ("texts-not-a-list", {"json": {**good, "texts": "hello"}}, 422),
        ("text-not-a-string", {"json": {**good, "texts": [1, 2]}}, 422),
        ("unknown-field", {"json": {**good, "text": "typo"}}, 422),
        ("too-many-texts", {"json": {**good, "texts": ["hi"] * (LIMITS["max_texts_per_request"] + 1)}}, 422),
        ("text-too-long", {"json": {**good, "texts": ["x" * (LIMITS["max_chars_per_text"] + 1)]}}, 422),
        ("body-too-large", {"json": {**good, "pad": "x" * LIMITS["max_body_bytes"]}}, 413),
        ("unknown-adapter", {"json": {**good, "adapter": "nosuch"}}, 404),
        ("path-like-adapter", {"json": {**good, "adapter": "../../etc/passwd"}}, 422),
        ("bad-top-k", {"json": {**good, "top_k": -1}}, 422),
    ]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def soak(url: str, names: list[str], texts: list[str], pid: int, args) -> dict:
    bad = bad_requests(names)
    latencies: list[float] = []
    outcome: Counter = Counter()  # (kind, status or exception name)
    wrong: Counter = Counter()    # answers other than the expected one
    memory = [(0.0, rss_mb(pid))]
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60, trust_env=False) as c:
        start = time.perf_counter()
        deadline = start + args.seconds

        async def client(k: int) -> None:
            rng = random.Random(k)
            while time.perf_counter() < deadline:
                if rng.random() < args.bad_fraction:
                    kind, request, expected = rng.choice(bad)
                else:
                    kind, expected = "valid", 200
                    request = {"json": {"texts": rng.sample(texts, rng.randint(1, 8)), "adapter": rng.choice(names),
                                        "top_k": rng.randint(1, 3)}}
                t0 = time.perf_counter()
                try:
                    r = await c.post("/v1/classify", **request)
                    status = r.status_code
                    one_line = status == 200 or "\n" not in r.json().get("error", "\n")
                except httpx.HTTPError as e:
                    status, one_line = type(e).__name__, False
                outcome[(kind, status)] += 1
                if status != expected or not one_line:
                    wrong[(kind, status)] += 1
                elif kind == "valid":
                    latencies.append(1000 * (time.perf_counter() - t0))

        async def sampler() -> None:
            while time.perf_counter() < deadline:
                await asyncio.sleep(min(args.sample_seconds, max(0.0, deadline - time.perf_counter())))
                memory.append((time.perf_counter() - start, rss_mb(pid)))

        await asyncio.gather(sampler(), *[client(k) for k in range(args.concurrency)])
        elapsed = time.perf_counter() - start
        health = (await c.get("/healthz")).json()
    latencies.sort()
    by_class = Counter()
    for (_, status), n in outcome.items():
        by_class[f"{str(status)[0]}xx" if isinstance(status, int) else status] += n
    return {
        "seconds": round(elapsed, 1), "concurrency": args.concurrency, "requests": sum(outcome.values()),
        "requests_per_second": round(sum(outcome.values()) / elapsed, 1), "by_class": dict(sorted(by_class.items())),
        "by_kind": {f"{kind} → {status}": n for (kind, status), n in sorted(outcome.items(), key=str)},
        "unexpected": {f"{kind} → {status}": n for (kind, status), n in wrong.items()},
        "valid_p50_ms": round(percentile(latencies, 50), 1), "valid_p99_ms": round(percentile(latencies, 99), 1),
        "rss_mb_start": round(memory[0][1], 1), "rss_mb_end": round(memory[-1][1], 1),
        "rss_mb_min": round(min(m for _, m in memory), 1), "rss_mb_max": round(max(m for _, m in memory), 1),
        "rss_samples": [[round(t), round(m, 1)] for t, m in memory],
        "texts_classified": health["texts"], "model_calls": health["batches"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="run or export folder (repeat for several)")
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--bad-fraction", type=float, default=0.15, help="share of malformed requests")
    ap.add_argument("--sample-seconds", type=float, default=10, help="how often the server's RSS is read")
    ap.add_argument("--threads", type=int, help="server's torch threads (default: torch's)")
    ap.add_argument("--json", action="store_true", help="also print the summary as one JSON line")
    args = ap.parse_args()
    texts = read_texts()
    with running_server(args.run, LIMITS, args.threads) as (url, names, proc):
        with httpx.Client(base_url=url, trust_env=False) as c:  # warm-up: first calls allocate buffers
            for i in range(20):
                c.post("/v1/classify", json={"texts": texts[i * 8:(i + 1) * 8], "adapter": names[i % len(names)]})
        print(f"soak: {', '.join(names)}; {args.concurrency} clients for {args.seconds:g} s, "
              f"{100 * args.bad_fraction:.0f}% malformed requests", flush=True)
        r = asyncio.run(soak(url, names, texts, proc.pid, args))
    print(f"requests {r['requests']} in {r['seconds']} s ({r['requests_per_second']} req/s), "
          f"{r['texts_classified']} texts in {r['model_calls']} model calls")
    print("answers by class: " + ", ".join(f"{k} {v}" for k, v in r["by_class"].items()))
    for k, v in r["by_kind"].items():
        print(f"  {k:<32} {v:>7}")
    print(f"valid requests: p50 {r['valid_p50_ms']} ms, p99 {r['valid_p99_ms']} ms")
    print(f"server RSS: {r['rss_mb_start']} MB after warm-up → {r['rss_mb_end']} MB at the end "
          f"(min {r['rss_mb_min']}, max {r['rss_mb_max']} over {len(r['rss_samples'])} samples)")
    print("unexpected answers: " + (", ".join(f"{k} ×{v}" for k, v in r["unexpected"].items()) or "none"))
    if args.json:
        print(json.dumps(r))
    return 1 if r["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
