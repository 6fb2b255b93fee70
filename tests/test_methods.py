"""Every method end to end on a tiny random BERT: run folder contents, reload parity through plain
transformers + PEFT, AdaLoRA's real rank allocation."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import make_tiny_model, tiny_overrides

from peftlab import cli, workflows

HERE = Path(__file__).resolve().parent


def train_cli(args) -> int:
    return cli.main(["train", *args])


def assert_reload_parity(run: Path, texts: list[str], tmp_path: Path) -> float:
    """Logits from plain PEFT in a fresh interpreter equal peftlab's evaluate logits."""
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    subprocess.run([sys.executable, str(HERE / "plain_reload.py"), str(run), str(tmp_path / "texts.json"),
                    str(tmp_path / "plain.npy")], check=True, capture_output=True)
    plain = np.load(tmp_path / "plain.npy")
    ours = workflows.evaluate(run)["logits"]
    diff = float(np.abs(plain - ours).max())
    assert diff <= 1e-4, f"reload changed logits by {diff}"
    return diff


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, small_data):
    out = tmp_path_factory.mktemp("runs")
    done = {}
    for method in ("full", "lora", "dora"):
        assert train_cli(tiny_overrides(tiny_model, small_data, out, method)) == 0
        done[method] = out / method
    return done


@pytest.mark.parametrize("method", ["full", "lora", "dora"])
def test_run_folder_is_complete_and_self_describing(runs, method):
    run = runs[method]
    for f in ("config.yaml", "labels.json", "metrics.jsonl", "summary.json", "report.md", "test_metrics.json"):
        assert (run / f).is_file(), f
    assert not (run / "checkpoints").exists() and not list(run.glob(".*tmp*"))
    if method == "full":
        assert (run / "model" / "model.safetensors").is_file()
    else:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (run / "adapter").iterdir()}
    s = json.loads((run / "summary.json").read_text())
    assert s["method"] == method and s["splits"] == {"train": 210, "validation": 30, "test": 60}
    assert s["parameters"] == f"{s['trainable_parameters']:,} / {s['total_parameters']:,} ({s['trainable_percent']:.2f}%)"
    assert 0 <= s["test_accuracy"] <= 1 and s["train_samples_per_second"] > 0
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert "| Epoch | Step | Training Loss | Validation Loss | Accuracy | F1 |" in (run / "report.md").read_text()
    cfg = (run / "config.yaml").read_text()
    assert "learning_rate: " in cfg and "transformers:" in cfg and "peft:" in cfg
    recorded = yaml.safe_load(cfg)  # where the data came from, so the run reads it again from anywhere
    for role in ("train", "test"):
        f = recorded["_run"]["data_files"][role]
        assert Path(f["path"]).is_absolute() and Path(recorded["data"][f"{role}_file"]).is_absolute()
        assert f["sha256"] == hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest() and f["bytes"] > 0
    if method == "full":
        assert s["trainable_parameters"] == s["total_parameters"]
    else:
        assert s["trainable_percent"] < 5


@pytest.mark.parametrize("method", ["full", "lora", "dora"])
def test_reload_with_plain_peft_gives_the_same_logits(runs, method, small_data, tmp_path):
    texts = pd.read_csv(small_data["test"]).text.tolist()
    assert_reload_parity(runs[method], texts, tmp_path)


def test_lora_learns_on_the_tiny_model(tiny_model, small_data, tmp_path):
    """Six balanced intents (chance 1/6): LoRA at a rate the tiny model needs reaches twice chance on test,
    its training loss falls, and the adapter itself trained (lora_B starts at zero), not only the head."""
    from safetensors.torch import load_file

    args = tiny_overrides(tiny_model, small_data, tmp_path, "lora", **{
        "train.epochs": 8, "train.learning_rate": 0.02, "train.head_learning_rate": 0.02})
    assert train_cli(args) == 0
    s = json.loads((tmp_path / "lora" / "summary.json").read_text())
    history = [json.loads(x) for x in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert s["test_accuracy"] >= 2 / 6, s["test_accuracy"]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.2
    weights = load_file(tmp_path / "lora" / "adapter" / "adapter_model.safetensors")
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert len(lora_b) == 2 * 2 and all(float(t.abs().max()) > 1e-3 for t in lora_b)  # 2 layers × query, value


def test_adalora_really_allocates_ranks(tiny_model, small_data, tmp_path, monkeypatch):
    from peft.tuners.adalora.model import AdaLoraModel

    calls = []
    original = AdaLoraModel.update_and_allocate

    def counting(self, global_step):
        calls.append(global_step)
        return original(self, global_step)

    from peft.tuners.adalora.layer import RankAllocator

    forced = []
    allocate = RankAllocator.update_and_allocate

    def recording(self, model, global_step, force_mask=False):
        if force_mask:
            forced.append(global_step)
        return allocate(self, model, global_step, force_mask)

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", counting)
    monkeypatch.setattr(RankAllocator, "update_and_allocate", recording)
    # Evaluate every step: the evaluation right before PEFT's final allocation must not become 'best'.
    args = tiny_overrides(tiny_model, small_data, tmp_path, "adalora", **{
        "train.epochs": 2, "adapter.deltaT": 1, "train.eval_every_steps": 1, "train.metric_for_best": "loss"})
    assert train_cli(args) == 0
    run = tmp_path / "adalora"
    s = json.loads((run / "summary.json").read_text())
    # Called once per optimizer step, with the step number, as PEFT documents.
    assert calls == list(range(s["optimizer_steps"])) and s["optimizer_steps"] == 2 * 14
    # The final allocation happens once, during step total - tfinal + 1; only later checkpoints are eligible.
    from peftlab.loop import adalora_final_step

    tfinal = s["adalora"]["tfinal"]
    assert forced == [28 - tfinal] and adalora_final_step(28, tfinal) == forced[0] + 1
    assert s["best_step"] >= forced[0] + 1
    a = s["adalora"]
    ranks = list(a["final_ranks"].values())
    assert a["modules"] == 4 and len(set(ranks)) > 1, ranks  # ranks moved between modules
    assert sum(ranks) == a["rank_sum"] == a["budget"] == 8 * 4
    assert a["effective_trainable_parameters"] < s["trainable_parameters"]
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"]
    assert_reload_parity(run, pd.read_csv(small_data["test"]).text.tolist(), tmp_path)


def test_pooler_missing_from_the_checkpoint_is_trained_and_saved(tmp_path, small_data):
    model = make_tiny_model(tmp_path / "no-pooler", with_pooler=False)
    assert train_cli(tiny_overrides(model, small_data, tmp_path, "lora", **{"train.epochs": 1})) == 0
    run = tmp_path / "lora"
    cfg = (run / "config.yaml").read_text()
    assert "bert.pooler.dense" in cfg  # recorded as newly initialised → modules_to_save
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert "bert.pooler.dense" in saved["modules_to_save"]
    assert_reload_parity(run, pd.read_csv(small_data["test"]).text.tolist(), tmp_path)


def test_pissa_adapter_is_converted_to_load_on_the_original_backbone(tiny_model, small_data, tmp_path):
    args = tiny_overrides(tiny_model, small_data, tmp_path, "lora", **{"train.epochs": 1,
                                                                      "adapter.init_lora_weights": "pissa"})
    assert train_cli(args) == 0
    assert not (tmp_path / "lora" / "initial_adapter").exists()
    assert_reload_parity(tmp_path / "lora", pd.read_csv(small_data["test"]).text.tolist(), tmp_path)


def test_rslora_and_final_epoch_on_train_and_validation(tiny_model, small_data, tmp_path):
    args = tiny_overrides(tiny_model, small_data, tmp_path, "lora", **{
        "train.epochs": 1, "adapter.use_rslora": "true", "train.final_epoch_on_train_and_validation": "true",
        "train.eval_every_steps": 5, "train.save_top_k": 2})
    assert train_cli(args) == 0
    s = json.loads((tmp_path / "lora" / "summary.json").read_text())
    assert s["final_epoch_on_train_and_validation"] and s["optimizer_steps"] == 14 + 15
    assert any("temperature" in n and "final epoch trained on" in n for n in s["notes"])  # calibration caveat
    history = [json.loads(x) for x in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [5, 10, 14]
    saved = json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())
    assert saved["use_rslora"] is True


def test_bias_pasted_from_a_peft_config_trains_and_reloads(tiny_model, small_data, tmp_path):
    args = tiny_overrides(tiny_model, small_data, tmp_path, "lora", **{"train.epochs": 1, "adapter.bias": "all"})
    assert train_cli(args) == 0
    s = json.loads((tmp_path / "lora" / "summary.json").read_text())
    saved = json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())
    assert saved["bias"] == "all" and s["trainable_parameters"] > 2_246  # r=8 LoRA + head alone: 2,246
    assert_reload_parity(tmp_path / "lora", pd.read_csv(small_data["test"]).text.tolist(), tmp_path)


def test_early_stopping_and_step_evaluation(tiny_model, small_data, tmp_path):
    # A learning rate too small to change any prediction: accuracy never improves after the first
    # evaluation, so patience 1 stops at the second one (step 4 of 28).
    args = tiny_overrides(tiny_model, small_data, tmp_path, "lora", **{
        "train.learning_rate": 1e-12, "train.eval_every_steps": 2, "train.early_stopping_patience": 1})
    assert train_cli(args) == 0
    s = json.loads((tmp_path / "lora" / "summary.json").read_text())
    assert s["stopped_early"] and s["optimizer_steps"] == 4 and s["best_step"] == 2


def test_a_run_config_reruns_as_a_config(runs):
    from peftlab import config

    cfg = config.load(runs["lora"] / "config.yaml", ["run_name=again"])
    assert cfg.adapter.method == "lora" and cfg.train.learning_rate == 5e-3  # the method's default, filled in
