"""Batch prediction and single-text latency: peftlab's predictors against the plain transformers pipeline.

    python bench/predict.py --run runs/banking77-lora-… [--texts 3080] [--batch-size 64] [--rounds 3]

Exports the run (merged + ONNX + ONNX int8) into a temporary folder, then, in this one process and
alternating between contenders round by round (the machine is shared, absolute times drift):
  - batch throughput on the Banking77 test texts: plain ``pipeline("text-classification", model=MERGED)``
    with its default batch size (1) and with ``batch_size`` = ours, against peftlab's PyTorch predictor
    on the same merged model, and its ONNX / ONNX-int8 predictors;
  - single-text latency (p50/p95 over ``--latency-texts`` calls of one text each).
Prints texts/s, the ratio to the pipeline at the same batch size, and label agreement with the pipeline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def best_of(rounds: list[float]) -> float:
    return min(rounds)


def _batch_labels(pr, batch_size: int):
    return lambda texts: [r["label"] for r in pr.predict(texts, batch_size=batch_size)]


def _single(pr):
    return lambda text: pr.predict([text])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished peftlab run folder")
    p.add_argument("--data-dir", default=os.environ.get("PEFTLAB_DATA_DIR", "../shared/data"))
    p.add_argument("--texts", type=int, default=3080, help="texts for the batch benchmark (Banking77 test)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--latency-texts", type=int, default=200)
    p.add_argument("--export-dir", help="reuse/keep exports here (default: a temporary folder)")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from transformers import pipeline

    from peftlab import predictor
    from peftlab.exporting import export

    texts = pd.read_csv(Path(args.data_dir) / "banking77" / "test.csv").text.tolist()[: args.texts]
    root = Path(args.export_dir or tempfile.mkdtemp(prefix="peftlab-bench-"))
    exports = {}
    for fmt in ("merged", "onnx"):
        folder = root / fmt
        if not (folder / "export.json").is_file():
            export(args.run, fmt, folder, quantize=fmt == "onnx", force=True)
        exports[fmt] = folder

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(texts)} texts; batch {args.batch_size}")
    max_len = predictor.load(exports["merged"]).max_length_tokens
    plain = pipeline("text-classification", model=str(exports["merged"]), device="cpu")
    ours = {"peftlab torch": predictor.load(exports["merged"]), "peftlab onnx": predictor.load(exports["onnx"]),
            "peftlab onnx-int8": predictor.load(exports["onnx"], quantized=True)}
    contenders = {
        "pipeline (batch 1, default)": lambda t: [r["label"] for r in plain(t, truncation=True, max_length=max_len)],
        f"pipeline (batch {args.batch_size})": lambda t: [
            r["label"] for r in plain(t, batch_size=args.batch_size, truncation=True, max_length=max_len)],
        **{name: _batch_labels(pr, args.batch_size) for name, pr in ours.items()},
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    labels: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            labels[name] = fn(texts)
            times[name].append(time.perf_counter() - t0)
    ref_name = f"pipeline (batch {args.batch_size})"
    ref = labels[ref_name]
    print(f"\n## Batch prediction ({len(texts)} texts, best of {args.rounds} rounds)\n")
    print("| predictor | texts/s | vs pipeline, same batch | label agreement with pipeline |")
    print("|---|---:|---:|---:|")
    for name in contenders:
        tps = len(texts) / best_of(times[name])
        ratio = best_of(times[ref_name]) / best_of(times[name])
        agree = sum(a == b for a, b in zip(labels[name], ref, strict=True)) / len(ref)
        print(f"| {name} | {tps:,.0f} | {ratio:.2f}× | {100 * agree:.2f}% |")

    sample = texts[: args.latency_texts]
    single = {"pipeline": lambda t: plain(t, truncation=True, max_length=max_len),
              **{name: _single(pr) for name, pr in ours.items()}}
    lat: dict[str, list[float]] = {k: [] for k in single}
    for text in sample:  # interleaved, so drift hits every contender alike
        for name, fn in single.items():
            t0 = time.perf_counter()
            fn(text)
            lat[name].append(1000 * (time.perf_counter() - t0))
    print(f"\n## Single-text latency ({len(sample)} calls each)\n")
    print("| predictor | p50 ms | p95 ms |")
    print("|---|---:|---:|")
    for name, xs in lat.items():
        xs.sort()
        print(f"| {name} | {statistics.median(xs):.2f} | {xs[int(0.95 * (len(xs) - 1))]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
