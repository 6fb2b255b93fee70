"""Shared fixtures: a tiny random BERT (weights don't matter for plumbing tests) with the embedded
model's tokenizer, and small CSV datasets cut from Banking77 under ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("PEFTLAB_DATA_DIR", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert (DATA_DIR / "banking77" / "train.csv").is_file(), f"Banking77 not found under {DATA_DIR}"
    return DATA_DIR


def make_tiny_model(folder: Path, model_type: str = "bert", with_pooler: bool = True, **config) -> Path:
    """A 2-layer, hidden-32 encoder of the given architecture, saved as safetensors, with MiniLM's tokenizer
    (``config``: more config keys, e.g. dropout probabilities)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from peftlab.modeling import resolve_backbone

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(resolve_backbone("default"))
    kw = dict(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64, max_position_embeddings=128)
    if model_type == "distilbert":
        kw = dict(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128)
    cfg = AutoConfig.for_model(model_type, **kw, **config)
    model = AutoModel.from_config(cfg, **({"add_pooling_layer": with_pooler} if model_type == "bert" else {}))
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, data_dir) -> dict[str, Path]:
    """Banking77 cut to 6 intents: 240 train / 60 test rows as CSV (text,category)."""
    folder = tmp_path_factory.mktemp("small-data")
    train = pd.read_csv(data_dir / "banking77" / "train.csv")
    test = pd.read_csv(data_dir / "banking77" / "test.csv")
    keep = sorted(train.category.unique())[:6]
    train = train[train.category.isin(keep)].groupby("category").head(40)
    test = test[test.category.isin(keep)].groupby("category").head(10)
    paths = {"train": folder / "train.csv", "test": folder / "test.csv"}
    train.to_csv(paths["train"], index=False)
    test.to_csv(paths["test"], index=False)
    return paths


def tiny_overrides(model: Path, data: dict[str, Path], out: Path, method: str, **extra) -> list[str]:
    base = {
        "model.name": str(model), "data.train_file": str(data["train"]), "data.test_file": str(data["test"]),
        "data.label_column": "category", "data.validation_size": 30, "adapter.method": method,
        "train.epochs": 2, "train.batch_size": 16, "train.seed": 0, "output_dir": str(out),
        "run_name": method,
        # Tiny models gain nothing from threads, and parallel small ops stall badly when another
        # process holds the cores (AdaLoRA's many small ops ran 100× slower with 2 threads under load).
        "train.num_threads": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def lora_pair(tmp_path_factory, tiny_model, small_data) -> Path:
    """Two finished LoRA runs of the tiny BERT, ``alpha`` and ``beta``, that differ by seed: two
    different adapters on one backbone (the serving, fuzzing and soak tests share them; read-only)."""
    from peftlab import cli

    out = tmp_path_factory.mktemp("lora-pair")
    for seed, name in enumerate(("alpha", "beta")):
        over = tiny_overrides(tiny_model, small_data, out, "lora", run_name=name, **{"train.epochs": 1, "train.seed": seed})
        assert cli.main(["train", *over]) == 0
    return out
