"""Training and evaluation speed: peftlab against the plain transformers Trainer + PEFT recipe.

    python bench/train.py methods [--methods full,lora,adalora,dora] [--epochs 2] [--repeats 1]
    python bench/train.py scaling [--sizes 1000,10000,100000] [--datasets banking77,ag_news]

``methods``: for each method, the plain recipe (``AutoModelForSequenceClassification`` + ``get_peft_model``
+ ``Trainer``, ``DataCollatorWithPadding``, max length 64, evaluation each epoch on the validation split,
test predictions at batch 64) and ``peftlab.train`` on the same backbone (the embedded MiniLM-L6), the same
splits, the same hyperparameters (peftlab's defaults for the method: learning rate, rank, alpha, dropout,
targets, weight decay, warm-up, schedule), batch size and epochs. Contenders alternate (plain first on even
repeats, peftlab first on odd ones), each in its own fresh process, so peak memory is the process's own
high-water mark (ru_maxrss) and neither inherits the other's caches. The ratios are what to read: the
machine is shared and absolute times drift.

``scaling``: peftlab alone, one epoch of LoRA on training sets resampled (with replacement) to each size,
from Banking77 (16 tokens a text) and from AG News (about 50): time per 1,000 examples, tokens/s and peak
memory, which should stay flat as the dataset grows.

FLOP count (printed as achieved GFLOP/s; padding is not counted, so wasted padding shows as a lower figure).
For a text of L real tokens, an encoder of ``n`` layers, hidden size h and feed-forward size f:
    forward  F(L) = n * (2 L (4 h^2 + 2 h f) + 4 L^2 h)
    (the four attention projections and the two feed-forward matrices, 2 FLOPs per multiply-add; then the
    L x L scores and the weighted sum of values; embeddings, norms, softmax and the head are left out: < 2 %.)
    training step: full fine-tuning 3 F (backward computes gradients for activations and for weights);
    LoRA / AdaLoRA / DoRA 2 F (the frozen weights need no weight gradient; the adapters' own are < 1 %).
    Training time includes the per-epoch validation passes (F each), which are counted too.
The reference printed beside it is this machine's fp32 matrix-product rate, measured at the start.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full", "lora", "adalora", "dora")


# ---------------------------------------------------------------------------------------------- FLOPs

def forward_flops(lengths, layers: int, hidden: int, ffn: int) -> float:
    """Useful forward FLOPs over texts of the given token lengths (formula in the module docstring)."""
    return float(sum(layers * (2 * n * (4 * hidden**2 + 2 * hidden * ffn) + 4 * n * n * hidden) for n in lengths))


def padding_share(lengths: list[int], batch_size: int, grouped: bool, seed: int = 0) -> float:
    """Share of padding among the tokens of one epoch's batches, each padded to its longest text: random
    batches (the Trainer's default sampler) or transformers' LengthGroupedSampler (peftlab's)."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    g = torch.Generator().manual_seed(seed)
    order = (list(LengthGroupedSampler(batch_size, lengths=lengths, generator=g)) if grouped
             else torch.randperm(len(lengths), generator=g).tolist())
    padded = sum(len(b) * max(lengths[i] for i in b)
                 for b in (order[k:k + batch_size] for k in range(0, len(order), batch_size)))
    return 1 - sum(lengths) / padded


def matmul_gflops(seconds: float = 2.0) -> float:
    """This machine's fp32 matrix-product rate at encoder shapes (tokens x hidden @ hidden x 4 hidden)."""
    import torch

    a, b = torch.randn(2048, 384), torch.randn(384, 1536)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return n * 2 * 2048 * 384 * 1536 / (time.perf_counter() - t0) / 1e9


# ------------------------------------------------------------------------------------ one measurement

def _splits_and_config(args):
    import peftlab

    overrides = [f"data.data_dir={args.data_dir}", f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
                 f"train.eval_batch_size={args.eval_batch_size}", f"output_dir={args.output_dir}",
                 f"train.seed={args.seed}", f"train.precision={getattr(args, 'precision', None) or 'fp32'}"]
    if args.train_file:
        overrides += [f"data.train_file={args.train_file}", f"data.test_file={args.test_file}", "data.dataset=null",
                      f"data.validation_file={args.validation_file}"]
    if args.max_train_examples:
        overrides.append(f"data.max_train_examples={args.max_train_examples}")
    if args.max_test_examples:
        overrides.append(f"data.max_test_examples={args.max_test_examples}")
    config_file = ROOT / "configs" / f"banking77-{args.method}.yaml"
    cfg = peftlab.config.load(config_file, overrides)
    from peftlab import data

    return cfg, data.load(cfg.data, cfg.train.seed)


def run_peftlab(args) -> dict:
    import peftlab
    from peftlab.rundir import read_summary

    cfg, splits = _splits_and_config(args)
    run = peftlab.train(cfg)
    s = read_summary(run)
    out = {"train_seconds": s["train_seconds"], "train_examples": round(s["train_samples_per_second"] * s["train_seconds"]),
           "eval_samples_per_second": s["eval_samples_per_second"], "accuracy": s["test_accuracy"], "f1": s["test_f1"],
           "peak_rss_mb": _peak_rss_mb()}  # before the extra evaluation rounds reload the run
    if args.eval_rounds > 1:  # more test-set passes as train() makes them (merged, length-sorted); keep the best
        from peftlab.modeling import merged_for_inference
        from peftlab.predictor import predict_logits
        from peftlab.rundir import load_run
        from peftlab.tokens import encode

        model, tok, _, _ = load_run(run)
        ids = encode(splits.test.text, tok, cfg.model.max_length_tokens)
        for _ in range(args.eval_rounds - 1):
            t0 = time.perf_counter()
            with merged_for_inference(model):
                predict_logits(model, ids, tok.pad_token_id or 0, args.eval_batch_size)
            out["eval_samples_per_second"] = max(out["eval_samples_per_second"], len(ids) / (time.perf_counter() - t0))
    return out


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_plain(args) -> dict:
    """The usual notebook recipe (Trainer + get_peft_model), with peftlab's hyperparameters for the method."""
    import numpy as np
    from datasets import Dataset
    from peft import AdaLoraConfig, LoraConfig, TaskType, get_peft_model
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from peftlab import modeling
    from peftlab.loop import optimizer_steps

    cfg, splits = _splits_and_config(args)
    path = modeling.resolve_backbone(cfg.model.name)
    tok = AutoTokenizer.from_pretrained(path)
    labels = splits.labels
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels), id2label=labels.id2label,
                                                               label2id={v: k for k, v in labels.id2label.items()})
    a = cfg.adapter
    steps = optimizer_steps(len(splits.train), cfg.train)[1]
    common = dict(task_type=TaskType.SEQ_CLS, target_modules=["query", "value"], lora_alpha=a.lora_alpha,
                  lora_dropout=a.lora_dropout)
    if a.method == "lora" or a.method == "dora":
        model = get_peft_model(model, LoraConfig(r=a.r, use_dora=a.method == "dora", **common))
    elif a.method == "adalora":  # under the plain Trainer update_and_allocate is never called (as in the notebooks)
        model = get_peft_model(model, AdaLoraConfig(init_r=a.init_r, target_r=a.target_r, tinit=int(0.1 * steps),
                                                    tfinal=int(0.2 * steps), deltaT=a.deltaT, total_step=steps, **common))

    def encode(frame):
        ds = Dataset.from_dict({"text": list(frame.text), "label": labels.encode(frame.label)})
        return ds.map(lambda b: tok(b["text"], truncation=True, max_length=cfg.model.max_length_tokens),
                      batched=True, remove_columns=["text"])

    train, val, test = encode(splits.train), encode(splits.validation), encode(splits.test)

    def compute_metrics(p):
        return {"accuracy": accuracy_score(p.label_ids, p.predictions.argmax(-1))}

    targs = TrainingArguments(
        output_dir=str(Path(args.output_dir) / "plain"), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size, num_train_epochs=args.epochs, learning_rate=cfg.learning_rate,
        weight_decay=cfg.train.weight_decay, warmup_steps=int(cfg.train.warmup_ratio * steps),
        lr_scheduler_type=cfg.train.lr_scheduler, eval_strategy="epoch", save_strategy="no", logging_strategy="no",
        report_to=[], disable_tqdm=True, seed=cfg.train.seed, use_cpu=True)
    trainer = Trainer(model=model, args=targs, train_dataset=train, eval_dataset=val,
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=compute_metrics)
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    peak = _peak_rss_mb()
    eval_seconds = math.inf
    for _ in range(args.eval_rounds):  # best of the rounds, as for peftlab
        t0 = time.perf_counter()
        out = trainer.predict(test)
        eval_seconds = min(eval_seconds, time.perf_counter() - t0)
    pred = np.asarray(out.predictions).argmax(-1)
    return {"train_seconds": train_seconds, "train_examples": len(train) * args.epochs, "peak_rss_mb": peak,
            "eval_samples_per_second": len(test) / eval_seconds,
            "accuracy": float(accuracy_score(out.label_ids, pred)),
            "f1": float(f1_score(out.label_ids, pred, average="macro", labels=np.arange(len(labels)), zero_division=0))}


def child(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run_plain(args) if args.impl == "plain" else run_peftlab(args)
    print("RESULT " + json.dumps(result), flush=True)


def measure(impl: str, method: str, args, **extra) -> dict:
    """Run one measurement in a fresh process; return its RESULT line. ``impl`` "peftlab-bf16" is peftlab
    with train.precision=bf16 (autocast)."""
    precision = "bf16" if impl.endswith("-bf16") else "fp32"
    with tempfile.TemporaryDirectory(prefix="peftlab-bench-") as out:
        cmd = [sys.executable, __file__, "_child", "--impl", impl.removesuffix("-bf16"), "--method", method,
               "--output-dir", out, "--precision", precision, "--seed", str(extra.get("seed", args.seed)),
               "--data-dir", args.data_dir, "--epochs", str(extra.get("epochs", args.epochs)),
               "--batch-size", str(args.batch_size), "--eval-batch-size", str(args.eval_batch_size),
               "--eval-rounds", str(getattr(args, "eval_rounds", 1))]
        for key in ("max_train_examples", "max_test_examples", "train_file", "validation_file", "test_file"):
            value = extra.get(key, getattr(args, key, None))
            if value:
                cmd += [f"--{key.replace('_', '-')}", str(value)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{impl} {method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------------------------- reports

def _lengths(args, method: str = "lora", **extra):
    """Token lengths (as both contenders truncate them) of train, validation and test."""
    from transformers import AutoTokenizer

    from peftlab import modeling

    ns = argparse.Namespace(**{**vars(args), "method": method, "output_dir": "unused", **extra})
    ns.train_file, ns.test_file = extra.get("train_file"), extra.get("test_file")
    ns.validation_file = extra.get("validation_file")
    cfg, splits = _splits_and_config(ns)
    tok = AutoTokenizer.from_pretrained(modeling.resolve_backbone(cfg.model.name))
    enc = lambda f: [len(x) for x in tok(list(f.text), truncation=True, max_length=cfg.model.max_length_tokens)["input_ids"]]  # noqa: E731
    return enc(splits.train), enc(splits.validation), enc(splits.test)


def _shape():
    from transformers import AutoConfig

    from peftlab import modeling

    c = AutoConfig.from_pretrained(modeling.resolve_backbone(modeling.DEFAULT_MODEL_NAME))
    return c.num_hidden_layers, c.hidden_size, c.intermediate_size


def cmd_methods(args) -> None:
    peak = matmul_gflops()
    layers, hidden, ffn = _shape()
    train_len, val_len, test_len = _lengths(args)
    print(f"machine: fp32 matmul {peak:.0f} GFLOP/s, {os.cpu_count()} CPUs, torch threads default; "
          f"{len(train_len)} train / {len(val_len)} validation / {len(test_len)} test texts, "
          f"mean {statistics.mean(train_len):.1f} tokens; batch {args.batch_size}, eval batch {args.eval_batch_size}, "
          f"{args.epochs} epoch(s)", flush=True)
    print(f"padding, share of the training tokens computed: random batches of {args.batch_size} (the plain "
          f"recipe) {100 * padding_share(train_len, args.batch_size, grouped=False):.0f} %, length-grouped "
          f"(peftlab) {100 * padding_share(train_len, args.batch_size, grouped=True):.0f} %", flush=True)
    f_train, f_val, f_test = (forward_flops(x, layers, hidden, ffn) for x in (train_len, val_len, test_len))
    rows = []
    for method in args.methods.split(","):
        impls = ("plain", "peftlab", "peftlab-bf16") if args.with_bf16 else ("plain", "peftlab")
        results: dict[str, list[dict]] = {impl: [] for impl in impls}
        for rep in range(args.repeats):  # repeat k uses seed + k (same splits for every contender)
            for impl in (impls if rep % 2 == 0 else impls[::-1]):
                r = measure(impl, method, args, seed=args.seed + rep)
                results[impl].append(r)
                print(f"  {method:8s} {impl:12s} seed {args.seed + rep}  train {r['train_examples'] / r['train_seconds']:7.1f}/s  "
                      f"eval {r['eval_samples_per_second']:7.1f}/s  peak {r['peak_rss_mb']:6.0f} MB  "
                      f"accuracy {100 * r['accuracy']:.2f}%", flush=True)
        mult = 3 if method == "full" else 2
        train_flops = args.epochs * (mult * f_train + f_val)
        for impl, rs in results.items():
            train_s = statistics.median(r["train_seconds"] for r in rs)
            eval_sps = statistics.median(r["eval_samples_per_second"] for r in rs)
            rows.append({"method": method, "impl": impl, "train_sps": statistics.median(r["train_examples"] / r["train_seconds"] for r in rs),
                         "eval_sps": eval_sps, "peak_mb": max(r["peak_rss_mb"] for r in rs),
                         "accuracy": statistics.mean(r["accuracy"] for r in rs), "f1": statistics.mean(r["f1"] for r in rs),
                         "train_gflops": train_flops / train_s / 1e9,
                         "eval_gflops": f_test / (len(test_len) / eval_sps) / 1e9})
    print("\n| method | runner | train samples/s | eval samples/s | peak RSS MB | test accuracy | macro-F1 | "
          "train GFLOP/s | eval GFLOP/s | train × | eval × | memory × |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    by = {(r["method"], r["impl"]): r for r in rows}
    for r in rows:
        base = by[(r["method"], "plain")]
        ratio = lambda k, r=r, base=base: f"{r[k] / base[k]:.2f}×"  # noqa: E731
        print(f"| {r['method']} | {r['impl']} | {r['train_sps']:.1f} | {r['eval_sps']:.1f} | {r['peak_mb']:.0f} | "
              f"{100 * r['accuracy']:.2f}% | {100 * r['f1']:.2f}% | {r['train_gflops']:.1f} | {r['eval_gflops']:.1f} | "
              f"{ratio('train_sps')} | {ratio('eval_sps')} | {ratio('peak_mb')} |")
    print(f"\nGFLOP/s count real tokens only (module docstring); this machine's fp32 matmul: {peak:.0f} GFLOP/s.")


def _resampled(data_dir: str, dataset: str, size: int, folder: Path, seed: int = 0) -> tuple[str, str, str]:
    """A training file of exactly ``size`` rows drawn with replacement, and 200-row validation and 500-row
    test files (the same for every size, held out from the rows the training file is drawn from)."""
    import pandas as pd

    src = Path(data_dir) / dataset
    if dataset == "banking77":
        train, test = pd.read_csv(src / "train.csv"), pd.read_csv(src / "test.csv")
        train, test = (f.rename(columns={"category": "label"}) for f in (train, test))
    else:  # AG News: only the test split is here; title + description as peftlab joins them
        frame = pd.read_csv(src / "test.csv")
        frame = pd.DataFrame({"text": frame.iloc[:, 1].astype(str) + ". " + frame.iloc[:, 2].astype(str),
                              "label": frame.iloc[:, 0].astype(str)})
        test = frame.sample(n=500, random_state=seed)
        train = frame.drop(test.index)
    validation = train.sample(n=200, random_state=seed)
    train = train.drop(validation.index).sample(n=size, replace=True, random_state=seed)
    tr, va, te = (folder / f"{dataset}-{name}.csv" for name in (f"{size}-train", "validation", "test"))
    train[["text", "label"]].to_csv(tr, index=False)
    validation[["text", "label"]].to_csv(va, index=False)
    test[["text", "label"]].sample(n=min(500, len(test)), random_state=seed).to_csv(te, index=False)
    return str(tr), str(va), str(te)


def cmd_scaling(args) -> None:
    args.eval_rounds = 1  # training time and memory only
    rows = []
    with tempfile.TemporaryDirectory(prefix="peftlab-scaling-") as tmp:
        for dataset in args.datasets.split(","):
            for size in map(int, args.sizes.split(",")):
                files = dict(zip(("train_file", "validation_file", "test_file"),
                                 _resampled(args.data_dir, dataset, size, Path(tmp)), strict=True))
                lengths = _lengths(args, **files)[0]
                r = measure("peftlab", "lora", args, epochs=1, **files)
                row = {"dataset": dataset, "rows": size, "tokens": statistics.mean(lengths),
                       "per_1k": 1000 * r["train_seconds"] / size,
                       "tokens_s": sum(lengths) / r["train_seconds"], "peak": r["peak_rss_mb"]}
                rows.append(row)
                print(f"  {dataset} {row['rows']:>7,} rows: {row['per_1k']:.2f} s per 1k, peak {row['peak']:.0f} MB", flush=True)
    print("\n| texts from | training examples | mean tokens | seconds per 1k examples | tokens/s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dataset']} | {r['rows']:,} | {r['tokens']:.1f} | {r['per_1k']:.2f} | {r['tokens_s']:,.0f} | {r['peak']:.0f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["methods", "scaling", "_child"])
    p.add_argument("--data-dir", default=os.environ.get("PEFTLAB_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="repeat k uses seed + k; medians of speed, mean accuracy")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--with-bf16", action="store_true", help="also peftlab with train.precision=bf16 (numerics change)")
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=16, help="both runners (the plain recipe's 16)")
    p.add_argument("--eval-batch-size", type=int, default=64, help="both runners (the plain recipe's 64)")
    p.add_argument("--eval-rounds", type=int, default=3, help="test-set passes per run, best kept (both runners)")
    p.add_argument("--max-train-examples", type=int, help="a stratified subset, for a quick look")
    p.add_argument("--max-test-examples", type=int)
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--datasets", default="banking77,ag_news")
    p.add_argument("--impl", choices=["plain", "peftlab"], help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--output-dir", help=argparse.SUPPRESS)
    p.add_argument("--train-file", help=argparse.SUPPRESS)
    p.add_argument("--test-file", help=argparse.SUPPRESS)
    p.add_argument("--validation-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    {"methods": cmd_methods, "scaling": cmd_scaling, "_child": child}[args.command](args)


if __name__ == "__main__":
    main()
