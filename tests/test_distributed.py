"""Two processes under ``accelerate launch`` (CPU, gloo, loopback) train as one process does at the same
global batch: ``train.batch_size`` is global, each process takes half of every batch.

Dropout is off in the tiny model and the adapter so that the two runs can be compared step by step: with
it on they are equivalent but not equal (each process draws its own dropout masks).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml
from conftest import make_tiny_model, tiny_overrides

pytestmark = pytest.mark.filterwarnings("ignore")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: list[str], overrides: list[str], tmp_path) -> subprocess.CompletedProcess:
    cfg = tmp_path / f"cfg-{len(list(tmp_path.iterdir()))}.yaml"
    nested: dict = {}
    for item in overrides:
        key, value = item.split("=", 1)
        node = nested
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    cfg.write_text(yaml.safe_dump(nested))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*launcher, "-m", "peftlab.cli", "train", str(cfg)], capture_output=True, text=True,
                          env=env, timeout=600)


def _accelerate(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *args, "--main_process_port", str(_free_port()),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_two_processes_match_one(tmp_path, small_data, method):
    model = make_tiny_model(tmp_path / "tiny-no-dropout", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    common = {"adapter.lora_dropout": 0.0, "train.epochs": 2, "train.batch_size": 16, "train.eval_every_steps": 5,
              "train.learning_rate": 0.01}
    one = tiny_overrides(model, small_data, tmp_path / "runs", method, run_name="one", **common)
    two = tiny_overrides(model, small_data, tmp_path / "runs", method, run_name="two", **common)
    two = [o for o in two if not o.startswith("train.num_threads")] + ["train.num_threads=1"]
    single = _launch([sys.executable], one, tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = _launch(_accelerate("--multi_gpu", "--num_processes", "2"), two, tmp_path)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert multi.stdout.count("test accuracy") == 1, multi.stdout  # one summary line, from the main process

    a = json.loads((tmp_path / "runs" / "one" / "summary.json").read_text())
    b = json.loads((tmp_path / "runs" / "two" / "summary.json").read_text())
    assert (a["num_processes"], b["num_processes"]) == (1, 2)
    assert a["optimizer_steps"] == b["optimizer_steps"] > 0
    evals_a = [json.loads(x) for x in (tmp_path / "runs" / "one" / "metrics.jsonl").read_text().splitlines()]
    evals_b = [json.loads(x) for x in (tmp_path / "runs" / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals_a] == [e["step"] for e in evals_b] and len(evals_a) >= 4
    for ea, eb in zip(evals_a, evals_b, strict=True):
        # Same examples per step, gradients averaged over the two halves: equal up to float summation order.
        assert eb["eval_loss"] == pytest.approx(ea["eval_loss"], abs=2e-3), (ea, eb)
        # The logged training loss is a mean of per-batch means; an epoch's short last batch (210 = 13 x 16 + 2)
        # is split one text per process, which weighs it differently in that mean, not in training.
        assert eb["train_loss"] == pytest.approx(ea["train_loss"], abs=1e-2), (ea, eb)
        assert abs(eb["eval_accuracy"] - ea["eval_accuracy"]) <= 1 / 30 + 1e-9  # at most one validation text
    assert abs(b["test_accuracy"] - a["test_accuracy"]) <= 1 / 60 + 1e-9
    if method == "adalora":
        assert b["adalora"]["rank_sum"] == a["adalora"]["rank_sum"]
        assert b["adalora"]["final_ranks"] == a["adalora"]["final_ranks"]


def test_one_process_launch_of_two_is_refused(tmp_path, tiny_model, small_data):
    """Without --multi_gpu, accelerate launch starts one process on a machine without GPUs: say so."""
    over = tiny_overrides(tiny_model, small_data, tmp_path / "runs", "lora", run_name="refused")
    r = _launch(_accelerate("--num_processes", "2"), over, tmp_path)
    assert r.returncode != 0
    # peftlab's one line (accelerate's launcher then adds its own traceback for the failed child)
    assert "error: accelerate launch started one process" in r.stderr and "add --multi_gpu" in r.stderr
    assert "peftlab/" not in r.stderr, r.stderr[-2000:]  # no traceback through peftlab's code
    assert not (tmp_path / "runs" / "refused").exists()


def test_batch_must_divide_among_processes(tmp_path, tiny_model, small_data):
    over = tiny_overrides(tiny_model, small_data, tmp_path / "runs", "lora", run_name="odd", **{"train.batch_size": 15})
    r = _launch(_accelerate("--multi_gpu", "--num_processes", "2"), over, tmp_path)
    assert r.returncode != 0
    assert "must divide evenly among 2 processes" in r.stderr
    assert "peftlab/" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "runs" / "odd").exists()
