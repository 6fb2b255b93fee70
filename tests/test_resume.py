"""Interrupted runs continue exactly: an interruption in-process for every method, SIGKILL at random
points (several, some during a checkpoint write) in a subprocess, and determinism of two identical runs."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides
from safetensors.torch import load_file

from peftlab import checkpoint, cli
from peftlab.files import read_jsonl

# What must be identical between an uninterrupted and a resumed run (wall-clock figures differ).
SAME = ("test_accuracy", "test_f1", "test_loss", "best_step", "best_validation", "optimizer_steps",
        "trainable_parameters")


def outcome(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    out = {k: s[k] for k in SAME}
    out["evaluations"] = [{k: v for k, v in r.items() if k != "elapsed_seconds"} for r in read_jsonl(run / "metrics.jsonl")]
    if "adalora" in s:
        out["ranks"] = s["adalora"]["final_ranks"]
        out["rank_history"] = s["adalora"]["rank_history"]
    out["weights"] = {k: v.tolist() for k, v in load_file(next((run / "adapter").glob("*.safetensors"))
                                                         if (run / "adapter").is_dir() else
                                                         run / "model" / "model.safetensors").items()
                      if "classifier" in k}
    return out


def test_same_config_and_seed_give_identical_results(tiny_model, small_data, tmp_path):
    for name in ("first", "second"):
        args = tiny_overrides(tiny_model, small_data, tmp_path, "lora", run_name=name, **{"train.epochs": 2})
        assert cli.main(["train", *args]) == 0
    assert outcome(tmp_path / "first") == outcome(tmp_path / "second")


class Interrupt(BaseException):
    """Stands in for Ctrl-C / a crash at a chosen point (BaseException: nothing may swallow it)."""


@pytest.mark.parametrize("method", ["full", "lora", "adalora", "dora", "lora+final-epoch"])
def test_an_interrupted_run_resumes_to_the_same_result(method, tiny_model, small_data, tmp_path, monkeypatch):
    extra = {"train.epochs": 3, "train.eval_every_steps": 5, "train.checkpoint_every_steps": 3, "adapter.deltaT": 2}
    if method == "lora+final-epoch":  # interrupted at a state saved on the last step, then the extra epoch on train+validation
        method = "lora"
        extra.update({"train.max_steps": 18, "train.final_epoch_on_train_and_validation": True})
    args = tiny_overrides(tiny_model, small_data, tmp_path, method, run_name="whole", **extra)
    assert cli.main(["train", *args]) == 0
    whole = outcome(tmp_path / "whole")

    saves = []
    real_save = checkpoint.save

    def save_then_maybe_die(ckpt_dir, loop, *args):
        folder = real_save(ckpt_dir, loop, *args)
        saves.append(loop.step)
        if len(saves) in (2, 8):  # twice, the second time in epoch 2: a resumed run is interrupted again
            raise Interrupt
        return folder

    monkeypatch.setattr(checkpoint, "save", save_then_maybe_die)
    args = tiny_overrides(tiny_model, small_data, tmp_path, method, run_name="broken", **extra)
    for _ in range(2):
        with pytest.raises(Interrupt):
            cli.main(["train", *args])
        assert not (tmp_path / "broken" / "summary.json").exists()
    assert cli.main(["train", *args]) == 0
    # Saves every 3 steps and after each evaluation (every 5); each attempt went on from the last state.
    assert saves[:10] == [3, 5, 6, 9, 10, 12, 15, 18, 20, 21][:len(saves)]
    assert outcome(tmp_path / "broken") == whole
    assert not (tmp_path / "broken" / "checkpoints").exists()


def test_resume_checks_its_config_and_the_cli_flags(tiny_model, small_data, tmp_path, monkeypatch, capsys):
    def die(*a, **k):
        raise Interrupt

    args = tiny_overrides(tiny_model, small_data, tmp_path, "lora", run_name="r", **{"train.eval_every_steps": 5})
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save", lambda *a, real=checkpoint.save, **k: (real(*a, **k), die()))
        with pytest.raises(Interrupt):
            cli.main(["train", *args])
    capsys.readouterr()
    assert cli.main(["train", *args, "train.learning_rate=0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: the unfinished run '{tmp_path / 'r'}' was started with another config "
                          "(train.learning_rate 0.005 → 0.01)") and "--restart" in err and "\n" not in err
    assert cli.main(["train", *[a for a in args if not a.startswith("run_name=")], "--resume"]) == 2
    assert "resuming needs the run's name" in capsys.readouterr().err
    # --restart discards the state: the run starts from step 0 and finishes.
    assert cli.main(["train", *args, "train.learning_rate=0.01", "--restart"]) == 0
    assert read_jsonl(tmp_path / "r" / "metrics.jsonl")[0]["step"] == 5
    assert cli.main(["train", *args, "--resume"]) == 2
    assert "already finished; nothing to resume" in capsys.readouterr().err


def test_a_planted_pickle_resume_state_is_never_unpickled(tmp_path):
    """The state format has no pickle at all; a tampered state is a clear error, not code execution."""
    ckpt = tmp_path / "checkpoints"
    (ckpt / "state-3").mkdir(parents=True)
    (ckpt / "latest.json").write_text('{"state": "state-3", "step": 3}')
    (ckpt / "state-3" / "state.json").write_text("{}")
    marker = tmp_path / "pwned"
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / "state-3" / "tensors.safetensors").write_bytes(pickle.dumps(Evil()))
    from peftlab.errors import RunError

    with pytest.raises(RunError, match=r"resume state .* is unreadable .*delete that folder"):
        checkpoint.load(ckpt)
    assert not marker.exists()


# --- SIGKILL at random points --------------------------------------------------------------------------


def assert_nothing_half_written(run: Path) -> None:
    """Every file outside temporary names is whole: JSON and YAML parse, safetensors load, JSONL lines parse."""
    for f in run.rglob("*"):
        if not f.is_file() or any(part.startswith(".") for part in f.relative_to(run).parts):
            continue  # .name.tmp files and folders are the writes in flight; they are cleaned on resume
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".yaml":
            yaml.safe_load(f.read_text())
        elif f.suffix == ".safetensors":
            load_file(f)
        elif f.suffix == ".jsonl":
            for line in f.read_text().splitlines():
                json.loads(line)


def latest_step(run: Path) -> int:
    try:
        return json.loads((run / "checkpoints" / "latest.json").read_text())["step"]
    except (OSError, ValueError):
        return -1


def writing(run: Path) -> bool:
    try:
        return any(e.name.startswith(".state-") for e in os.scandir(run / "checkpoints"))
    except OSError:
        return False


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_result(tiny_model, small_data, tmp_path):
    extra = {"train.epochs": 6, "train.eval_every_steps": 7, "train.checkpoint_every_steps": 2,
             "adapter.deltaT": 2, "train.batch_size": 16}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    def start(name: str) -> subprocess.Popen:
        args = tiny_overrides(tiny_model, small_data, tmp_path, "adalora", run_name=name, **extra)
        return subprocess.Popen([sys.executable, "-m", "peftlab.cli", "train", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    p = start("whole")
    assert p.wait(timeout=900) == 0, p.stderr.read()  # generous: CI machines can be slow and shared
    whole = outcome(tmp_path / "whole")
    total = whole["optimizer_steps"]
    assert total == 6 * 14

    run, rng = tmp_path / "killed", random.Random(0)
    kills, mid_write, resumed_from = [], 0, []
    while True:
        p = start("killed")
        before = latest_step(run)
        resumed_from.append(before)
        if len(kills) == 8:  # enough: let this attempt finish
            break
        # Run to a later state (spread over the run, with jitter), then kill either in the middle of the
        # next state write or at a random instant (training, evaluating, writing the model and report).
        target = max(before + 1, (len(kills) + 1) * total // 10 + rng.randint(0, 3))
        during_write = len(kills) % 2 == 1
        deadline = time.monotonic() + 600
        while p.poll() is None and time.monotonic() < deadline:
            if latest_step(run) >= target and (writing(run) or not during_write):
                break
            time.sleep(0.0005)
        assert p.poll() is None, "the run finished before the chosen kill point"
        if not during_write:
            time.sleep(rng.uniform(0, 0.05))
        in_flight = writing(run)
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills.append(latest_step(run))
        mid_write += in_flight and writing(run)  # the kill left a state half-written
        assert not (run / "summary.json").exists()
        assert_nothing_half_written(run)
    assert p.wait(timeout=900) == 0, p.stderr.read()
    print(f"kills after states at steps {kills}; {mid_write} left a state half-written; total {total} steps")
    assert len(kills) == 8 and mid_write >= 1
    assert resumed_from[1:] == kills and sorted(kills) == kills  # each attempt went on from the last state
    assert outcome(run) == whole
    assert not (run / "checkpoints").exists() and not list(run.rglob(".*.tmp"))
    assert_nothing_half_written(run)


# --- the embedded model: SIGKILL right after an end-of-epoch state, and after a mid-epoch one ------------


@pytest.mark.slow
def test_sigkill_after_an_epoch_boundary_or_mid_epoch_state_resumes_exactly_on_the_embedded_model(data_dir, tmp_path):
    """Real weights and dropout: a resumed epoch must replay neither the previous epoch's data order nor
    another dropout stream. 720 training examples, 23 optimizer steps an epoch, 2 epochs."""
    base = ["train", f"data.data_dir={data_dir}", "data.max_train_examples=800", "data.validation_size=80",
            "data.max_test_examples=308", "train.epochs=2", "train.seed=7", f"output_dir={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def start(name: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "peftlab.cli", *base, f"run_name={name}", *extra], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def result(run: Path) -> dict:
        out = outcome(run)
        out["adapter"] = hashlib.sha256((run / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()
        return out

    p = start("whole")
    assert p.wait(timeout=900) == 0, p.stderr.read()
    whole = result(tmp_path / "whole")
    assert whole["evaluations"][0]["step"] == 23

    for name, extra, kill_after in (("boundary", (), 23), ("mid-epoch", ("train.checkpoint_every_steps=5",), 30)):
        p = start(name, *extra)
        deadline = time.monotonic() + 600
        while p.poll() is None and latest_step(tmp_path / name) < kill_after and time.monotonic() < deadline:
            time.sleep(0.0005)
        assert p.poll() is None and latest_step(tmp_path / name) == kill_after, f"{name}: no kill point"
        p.send_signal(signal.SIGKILL)
        p.wait()
        p = start(name, *extra)
        assert p.wait(timeout=900) == 0, p.stderr.read()
        assert result(tmp_path / name) == whole, name
