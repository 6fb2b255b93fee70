"""The peftlab command: thin subcommands over the Python API. User mistakes print ``error: …`` and exit 2."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
from dataclasses import fields

from . import config as config_mod
from . import matrix
from .config import DATA_DIR_ENV, EVAL_BATCH_SIZE, ServeLimits
from .console import setup_logging
from .errors import DataError, PeftlabError
from .files import read_json, write_text
from .report import regenerate
from .rundir import EXPORT_RECORD, read_summary

# Commands that train or predict import torch (seconds) when they run, so that --help and errors in the
# config are instant: workflows, loop, predictor, exporting, server and data (pandas) are imported there.

EPILOG = "Config keys: `peftlab keys`. Docs and examples: README.md."
# serve's command-line flags for the limits (ServeLimits' fields; YAML limits: uses the field names).
SERVE_FLAGS = {"max_texts_per_request": "max-texts", "max_chars_per_text": "max-chars",
               "max_body_bytes": "max-body-bytes", "max_batch_texts": "max-batch", "max_wait_ms": "max-wait-ms"}


def cmd_train(args) -> int:
    from .loop import process_state
    from .workflows import train

    overrides = list(args.overrides)
    cfg_file = None
    if overrides and "=" not in overrides[0]:
        cfg_file = overrides.pop(0)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    cfg = config_mod.load(cfg_file, overrides)
    run = train(cfg, resume=True if args.resume else False if args.restart else None)
    if not process_state().is_main_process:
        return 0  # under accelerate launch / torchrun: one summary, from the main process
    s = read_summary(run)
    print(f"test accuracy {100 * s['test_accuracy']:.2f}%  macro-F1 {100 * s['test_f1']:.2f}%  "
          f"trainable {s['parameters']}  train {s['train_seconds'] / 60:.1f} min")
    rejection = s.get("rejection", {})
    deciding = rejection.get("scorers", {}).get(rejection.get("method"))
    if deciding and "auroc" in deciding:  # out-of-scope texts were measured: the deciding scorer's figures
        print(f"out of scope ({rejection['method']}, {rejection['test_out_of_scope']} texts): AUROC "
              f"{100 * deciding['auroc']:.2f}%  OOS F1 {100 * deciding['oos_f1']:.2f}%  in-scope accuracy "
              f"{100 * deciding['in_scope_accuracy']:.2f}%  (report: every scorer)")
    print(f"run folder: {run}")
    return 0


def cmd_evaluate(args) -> int:
    from .workflows import evaluate

    cols = args.text_columns.split(",") if args.text_columns else None
    m = evaluate(args.run, args.data, cols, args.label_column, args.batch_size)
    m.pop("logits")
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    print(f"accuracy {100 * m['accuracy']:.2f}%  macro-F1 {100 * m['f1']:.2f}%  loss {m['loss']:.4f}  "
          f"({m['examples']} examples)")
    c = m["confidence"]
    print(f"calibration: temperature {c['temperature']:.3f}  ECE {100 * c['ece']:.2f}%  Brier {c['brier']:.4f}")
    if "rejection" in c:
        r = c["rejection"]
        print(f"out of scope ({m['out_of_scope_examples']} texts, {r['method']}): in-scope accuracy "
              f"{100 * r['in_scope_accuracy']:.2f}%  OOS recall {100 * r['oos_recall']:.2f}%  precision "
              f"{100 * r['oos_precision']:.2f}%  F1 {100 * r['oos_f1']:.2f}%  AUROC {100 * r['auroc']:.2f}%  "
              f"FPR@95 {100 * r['fpr_at_95']:.2f}%")
    print(f"\n{'label':<40} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    for name, r in m["per_class"].items():
        print(f"{name:<40} {r['precision']:>9.3f} {r['recall']:>9.3f} {r['f1-score']:>9.3f} {int(r['support']):>8}")
    return 0


def cmd_predict(args) -> int:
    import pandas as pd

    from .data import read_table
    from .predictor import load
    from .workflows import predict

    if args.input == "-":
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        ids = list(range(len(texts)))
    else:
        df = read_table(args.input)
        if args.text_column not in df.columns:
            raise DataError(f"{args.input}: column {args.text_column!r} not found (columns: "
                            f"{', '.join(map(str, df.columns))}); use --text-column")
        texts = df[args.text_column].fillna("").astype(str).tolist()
        ids = df[args.id_column].tolist() if args.id_column in df.columns else list(range(len(df)))
    predictor = load(args.run, quantized=args.quantized)
    results = predict(predictor, texts, args.batch_size, args.top_k, args.threshold)
    out = pd.DataFrame({"id": ids, "label": [r["label"] for r in results],
                        "score": [round(r["score"], 6) for r in results], "in_scope": [r["in_scope"] for r in results]})
    if predictor.confidence is not None and predictor.confidence.method != "none":
        out["ood_score"] = [round(r["ood_score"], 6) for r in results]
    if args.top_k > 1:
        out["top_k"] = [json.dumps([[lab, round(s, 6)] for lab, s in r["top_k"]]) for r in results]
    if args.output.endswith(".jsonl"):
        write_text(args.output, out.to_json(orient="records", lines=True))
    else:
        write_text(args.output, out.to_csv(index=False))
    print(f"{len(out)} predictions written to {args.output}")
    return 0


def cmd_export(args) -> int:
    from .exporting import export

    out = export(args.run, args.format, args.output, args.quantize, args.data, args.parity_examples, args.force)
    record = read_json(out / EXPORT_RECORD)
    p = record["parity"]
    line = (f"parity on {p['examples']} texts: max logit difference {p['max_abs_logit_diff']:.2e}, "
            f"label agreement {100 * p['label_agreement']:.2f}%")
    if p.get("accuracy_export") is not None:
        line += f", accuracy {100 * p['accuracy_reference']:.2f}% → {100 * p['accuracy_export']:.2f}%"
    if "decision_agreement" in p:
        line += f", out-of-scope decisions agree {100 * p['decision_agreement']:.2f}%"
    print(line)
    if "int8" in p:
        q = p["int8"]
        print(f"int8: max logit difference {q['max_abs_logit_diff']:.2e}, label agreement "
              f"{100 * q['label_agreement']:.2f}%" + (f", accuracy {100 * q['accuracy_export']:.2f}%"
                                                      if q.get("accuracy_export") is not None else "")
              + (f", out-of-scope decisions agree {100 * q['decision_agreement']:.2f}%"
                 if "decision_agreement" in q else ""))
    print(f"{args.format} export: {out}")
    return 0


def cmd_info(args) -> int:
    from .workflows import info

    i = info(args.run)
    s = i["summary"]
    if args.json:
        print(json.dumps(i, indent=2, default=str))
        return 0
    print(f"run        {i['run']}\nmethod     {s['method']}\ndataset    {s['dataset']}\nbackbone   {s['backbone']}")
    print(f"parameters {s['parameters']}\ntest       accuracy {100 * s['test_accuracy']:.2f}%  "
          f"macro-F1 {100 * s['test_f1']:.2f}%\ntrain      {s['train_seconds'] / 60:.1f} min, "
          f"{s['train_samples_per_second']:.0f} samples/s, peak {s['peak_memory_mb']:.0f} MB")
    print(f"labels     {len(i['labels'])}: {', '.join(i['labels'][:8])}{' …' if len(i['labels']) > 8 else ''}")
    return 0


def cmd_report(args) -> int:
    written = regenerate(args.run)
    for path in written:
        print(path)
    return 0


def cmd_keys(args) -> int:
    for key, default, text in config_mod.describe():
        print(f"{key:<45} {json.dumps(default):<14} {text}")
    return 0


def cmd_compare(args) -> int:
    command = "peftlab " + shlex.join(args.argv)
    items = list(args.overrides)
    if args.runs:
        if items:
            raise PeftlabError("compare --runs takes run folders only: drop the config and key=value overrides")
        if not args.output_dir:
            raise PeftlabError("compare --runs needs -o DIR: the folder for comparison.md/.csv")
        folder = matrix.compare_runs(args.runs, args.output_dir, command)
    else:
        if not items or "=" in items[0]:
            raise PeftlabError("compare needs a compare config (COMPARE.yaml) or --runs RUN …")
        folder = matrix.run(items[0], items[1:], args.data_dir, args.output_dir, command, not args.in_process)
    rows = list(csv.DictReader((folder / "comparison.csv").read_text().splitlines()))
    md = (folder / "comparison.md").read_text().splitlines()
    print("\n".join(line for line in md if line.startswith("|")))
    failed = [r["run"] for r in rows if r["status"] in ("failed", "skipped")]
    print(f"comparison: {folder / 'comparison.md'}" + (f"  ({len(failed)} of {len(rows)} runs failed or skipped)"
                                                        if failed else ""))
    return 1 if failed else 0


def cmd_serve(args) -> int:
    # oneDNN caches a compiled kernel, with its own copy of the weights' layout, per input shape (default
    # 1,024 of them). Requests come in every batch size × text length, so a server's memory grew by
    # 1.3 GB in 5 minutes (bench/soak.py) before the cache filled; 64 entries keep it flat at the
    # same speed (measured within 5 % at batch 1, 8 and 32). Read when torch first runs a kernel: set
    # before anything imports torch; an explicit setting in the environment wins.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    try:  # an optional extra: fail with the install line, not an ImportError
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise PeftlabError("peftlab serve needs fastapi and uvicorn: pip install 'peftlab[serve]'") from None
    from .server import serve

    flags = {key: getattr(args, key) for key in SERVE_FLAGS if getattr(args, key) is not None}
    serve(args.config, args.host, args.port, flags, args.threads)
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other error (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="peftlab", description="Fine-tune encoders for text classification with "
                                "full fine-tuning, LoRA, AdaLoRA and DoRA.", epilog=EPILOG)
    p.add_argument("-v", "--verbose", action="store_true", help="show library warnings and tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model and write a run folder",
                       description="peftlab train [CONFIG.yaml] [key=value ...]. Example: peftlab train "
                       "configs/banking77-lora.yaml train.epochs=3 --data-dir ../shared/data")
    t.add_argument("overrides", nargs="*", help="an optional YAML config, then key=value overrides")
    t.add_argument("--data-dir", help=f"folder with built-in datasets (default ${DATA_DIR_ENV})")
    t.add_argument("--output-dir", help="where run folders go (default runs/)")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the unfinished run named by run_name=… "
                       "(the default whenever that run saved a resume state and the config matches)")
    again.add_argument("--restart", action="store_true", help="discard an unfinished run of that name and start over")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="accuracy, macro-F1 and per-class metrics of a run")
    e.add_argument("run", help="run folder")
    e.add_argument("--data", help="labelled CSV/JSONL/Parquet file (default: the run's test split)")
    e.add_argument("--text-columns", help="comma-separated text column(s) of --data")
    e.add_argument("--label-column", help="label column of --data")
    e.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE, help=f"texts per batch (default {EVAL_BATCH_SIZE})")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="label texts from a CSV/JSONL file (or - for stdin lines)")
    pr.add_argument("run", help="run folder")
    pr.add_argument("input", help="CSV/JSONL/Parquet file with a text column, or - for one text per stdin line")
    pr.add_argument("-o", "--output", required=True,
                    help="output .csv (id,label,score,in_scope[,ood_score][,top_k]) or .jsonl")
    pr.add_argument("--text-column", default="text")
    pr.add_argument("--id-column", default="id", help="copied to the output when present (else the row number)")
    pr.add_argument("--top-k", type=int, default=1, help="also write the k best labels with scores")
    pr.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE, help=f"texts per batch (default {EVAL_BATCH_SIZE})")
    pr.add_argument("--quantized", action="store_true", help="with an ONNX export: use its int8 model")
    pr.add_argument("--threshold", type=float, help="override the run's out-of-scope threshold (its ood.method score)")
    pr.set_defaults(func=cmd_predict)

    x = sub.add_parser("export", help="export a run: adapter, merged transformers model, or ONNX",
                       description="peftlab export RUN --format {adapter,merged,onnx}. Every export is reloaded "
                       "and checked against the run on real texts; the check is written into export.json.")
    x.add_argument("run", help="run folder")
    x.add_argument("--format", required=True, choices=["adapter", "merged", "onnx"])
    x.add_argument("-o", "--output", help="export folder (default RUN/export-FORMAT)")
    x.add_argument("--quantize", action="store_true", help="onnx: also write an int8 model (dynamic quantisation)")
    x.add_argument("--data", help="labelled file for the parity check (default: the run's test split)")
    x.add_argument("--parity-examples", type=int, default=512, help="texts used by the parity check")
    x.add_argument("--force", action="store_true", help="replace an existing export folder")
    x.set_defaults(func=cmd_export)

    i = sub.add_parser("info", help="what a run folder holds: method, data, parameters, results")
    i.add_argument("run", help="run folder")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    r = sub.add_parser("report", help="write a run's report.md, report.html and plots again from its folder",
                       description="peftlab report RUN: regenerate report.md, the self-contained report.html and "
                       "plots/*.png (validation curves, losses, per-class F1 against training examples, most "
                       "confused pairs, confusion matrix, AdaLoRA ranks) from the run folder's files alone.")
    r.add_argument("run", help="finished run folder")
    r.set_defaults(func=cmd_report)

    c = sub.add_parser("compare", help="train and compare methods × settings × seeds, or compare finished runs",
                       description="peftlab compare COMPARE.yaml [key=value ...]: train every cell of the matrix that "
                       "is not finished yet (finished ones are reused), then write comparison.md/.csv/.html and plots "
                       "to <output_dir>/<name>/. peftlab compare --runs RUN ... -o DIR compares finished run folders. "
                       "Exit code 1 when a run failed (the table marks it).")
    c.add_argument("overrides", nargs="*", metavar="COMPARE.yaml [key=value]",
                   help="compare config, then key=value overrides applied to every run")
    c.add_argument("--data-dir", help=f"folder with built-in datasets (default ${DATA_DIR_ENV})")
    c.add_argument("-o", "--output-dir", help="where the comparison goes (default: the config's output_dir, runs/)")
    c.add_argument("--runs", nargs="+", metavar="RUN", help="compare these finished run folders instead of training")
    c.add_argument("--in-process", action="store_true", help="train every run in this process (starts quicker; "
                   "peak memory then includes earlier runs'); default: each run in its own process")
    c.set_defaults(func=cmd_compare)

    k = sub.add_parser("keys", help="every config key with its default and meaning")
    k.set_defaults(func=cmd_keys)

    sv = sub.add_parser("serve", help="HTTP service: many adapters on one base model, micro-batched",
                        description="peftlab serve CONFIG_OR_DIR: a YAML file (adapters: {name: folder}, optional "
                        "limits:), one run/export folder, or a folder of them (unfinished runs are skipped). "
                        "POST /v1/classify, GET /v1/adapters, GET /healthz, docs at /docs.")
    sv.add_argument("config", metavar="CONFIG_OR_DIR", help="serve YAML, run/export folder, or folder of runs")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    for f in fields(ServeLimits):  # the limits' names, types, help and defaults come from ServeLimits
        sv.add_argument(f"--{SERVE_FLAGS[f.name]}", dest=f.name, type=float if f.type in (float, "float") else int,
                        help=f"{f.metadata['help']} (default {f.default:g})")
    sv.add_argument("--threads", type=int, help="torch threads for the model (default: torch's)")
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come after options (train CONFIG --data-dir D k=v): argparse leaves
    # those over, and they belong to train's overrides.
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if extra:
        if args.command not in ("train", "compare") or any("=" not in x or x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except PeftlabError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
