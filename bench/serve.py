"""Load test for `peftlab serve`: throughput and latency at several concurrency levels.

    python bench/serve.py --run runs/banking77-lora-… [--run RUN2] --seconds 10 --concurrency 1,8,32

Starts `peftlab serve` in a subprocess on 127.0.0.1 and a free port, waits for /healthz, then at each
concurrency level keeps that many clients busy for --seconds, each request one Banking77 test text
(with several runs, requests alternate between the adapters). Prints requests, req/s, p50/p95/p99
latency and errors per level, plus the server's batching (texts per model call). The server is always
stopped at the end. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def read_texts(limit: int = 3080) -> list[str]:
    data_dir = Path(os.environ.get("PEFTLAB_DATA_DIR", REPO.parent / "shared" / "data"))
    with open(data_dir / "banking77" / "test.csv", newline="") as f:
        return [row["text"] for row in csv.DictReader(f)][:limit]


def write_config(runs: list[str], folder: Path, extra_limits: dict) -> tuple[Path, list[str]]:
    """A serve YAML naming each run after its folder (made unique), with any limits given."""
    names, lines = [], ["adapters:"]
    for run in runs:
        base = "".join(c if c.isalnum() or c in "_.-" else "-" for c in Path(run).resolve().name)[:60] or "run"
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
        lines.append(f"  {name}: {str(Path(run).resolve())!r}")
    if extra_limits:
        lines += ["limits:", *[f"  {k}: {v}" for k, v in extra_limits.items()]]
    path = folder / "serve.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path, names


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(trust_env=False) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
            try:
                if c.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout_s:.0f} s")


@contextlib.contextmanager
def running_server(runs: list[str], limits: dict, threads: int | None = None, startup_timeout: float = 300):
    """Start `peftlab serve` on the runs (one adapter each) on loopback; yield (url, adapter names,
    process) once /healthz answers. Prints the server log's tail if the body fails; always stops it."""
    port = free_port()
    url = f"http://{HOST}:{port}"
    with tempfile.TemporaryDirectory(prefix="peftlab-bench-") as tmp:
        config, names = write_config(runs, Path(tmp), limits)
        cmd = [sys.executable, "-m", "peftlab.cli", "serve", str(config), "--host", HOST, "--port", str(port)]
        if threads:
            cmd += ["--threads", str(threads)]
        log = open(Path(tmp) / "server.log", "w+")  # noqa: SIM115 - read back on failure
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            wait_ready(proc, url, startup_timeout)
            yield url, names, proc
        except BaseException:
            log.seek(0)
            print("server log (last lines):\n" + "".join(log.readlines()[-20:]), file=sys.stderr)
            raise
        finally:  # always stop the server
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))]


async def load_level(url: str, names: list[str], texts: list[str], concurrency: int, seconds: float) -> dict:
    """``concurrency`` clients sending one-text requests back to back for ``seconds``."""
    latencies, errors = [], 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60, trust_env=False) as c:
        before = (await c.get("/healthz")).json()
        deadline = time.perf_counter() + seconds

        async def client(k: int) -> None:
            nonlocal errors
            rng, i = random.Random(k), 0
            while time.perf_counter() < deadline:
                body = {"texts": [rng.choice(texts)], "adapter": names[(k + i) % len(names)]}
                i += 1
                t0 = time.perf_counter()
                try:
                    r = await c.post("/v1/classify", json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(1000 * (time.perf_counter() - t0))
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*[client(k) for k in range(concurrency)])
        elapsed = time.perf_counter() - start
        after = (await c.get("/healthz")).json()
    latencies.sort()
    batches = after["batches"] - before["batches"]
    return {"concurrency": concurrency, "requests": len(latencies) + errors, "rps": len(latencies) / elapsed,
            "p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "p99": percentile(latencies, 99),
            "errors": errors, "texts_per_batch": (after["texts"] - before["texts"]) / max(batches, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="run or export folder (repeat for several)")
    ap.add_argument("--seconds", type=float, default=10, help="duration of each concurrency level")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--max-wait-ms", type=float, help="server's batching window (default: serve's)")
    ap.add_argument("--max-batch", type=int, help="server's texts per model call (default: serve's)")
    ap.add_argument("--threads", type=int, help="server's torch threads (default: torch's)")
    ap.add_argument("--startup-timeout", type=float, default=300)
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    texts = read_texts()

    limits = {k: v for k, v in (("max_wait_ms", args.max_wait_ms), ("max_batch_texts", args.max_batch)) if v is not None}
    t0 = time.perf_counter()
    with running_server(args.run, limits, args.threads, args.startup_timeout) as (url, names, _):
        print(f"server ready in {time.perf_counter() - t0:.1f} s: {', '.join(names)} "
              f"({len(texts)} Banking77 test texts, 1 text per request, {args.seconds:g} s per level)")
        asyncio.run(load_level(url, names, texts, 1, min(1.0, args.seconds)))  # warm-up, not reported
        print(f"\n{'concurrency':>11} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
              f"{'errors':>7} {'texts/batch':>12}")
        for level in levels:
            r = asyncio.run(load_level(url, names, texts, level, args.seconds))
            print(f"{r['concurrency']:>11} {r['requests']:>9} {r['rps']:>8.1f} {r['p50']:>8.1f} {r['p95']:>8.1f} "
                  f"{r['p99']:>8.1f} {r['errors']:>7} {r['texts_per_batch']:>12.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
