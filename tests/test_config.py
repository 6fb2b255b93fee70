"""Config contracts: exact user-facing messages, one problem per line under a heading, suggestions only
when close, PEFT's own keys taken or explained, every shipped config valid and read as written."""

import difflib
from pathlib import Path

import pytest
import yaml

from peftlab import config
from peftlab.config import ConfigError
from peftlab.errors import SUGGESTION_CUTOFF

REPO = Path(__file__).resolve().parents[1]


def problems(*overrides):
    with pytest.raises(ConfigError) as e:
        config.load(overrides=list(overrides))
    return e.value.problems


def message(data: dict, source: str | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        config.from_dict(data, source)
    return str(e.value)


def test_defaults_are_valid_and_resolve_the_method_learning_rate():
    cfg = config.load()
    assert cfg.adapter.method == "lora" and cfg.model.name == "default" and cfg.adapter.bias == "none"
    assert cfg.learning_rate == 5e-3
    assert config.load(overrides=["adapter.method=full"]).learning_rate == 1e-4
    assert config.load(overrides=["adapter.method=adalora"]).learning_rate == 5e-3
    assert config.load(overrides=["train.learning_rate=5e-4"]).learning_rate == 5e-4


def test_unknown_key_names_the_key_and_suggests_the_near_miss_only():
    assert problems("train.lerning_rate=1e-3") == ["unknown key 'train.lerning_rate' — did you mean 'train.learning_rate'?"]
    assert problems("trian.epochs=3") == ["unknown key 'trian' — did you mean 'train'?"]
    with pytest.raises(ConfigError) as e:
        config.load(overrides=["train.foo=1"])
    assert str(e.value) == ("unknown key 'train.foo' (train keys: epochs, batch_size, eval_batch_size, learning_rate, "
                            "head_learning_rate, weight_decay, warmup_ratio, lr_scheduler, gradient_accumulation_steps, "
                            "max_grad_norm, precision, eval_every_steps, metric_for_best, save_top_k, "
                            "checkpoint_every_steps, early_stopping_patience, final_epoch_on_train_and_validation, seed, "
                            "num_threads, fast_dropout, max_steps, report_to, tracking_dir, tracking_project)")


def test_other_tools_names_for_our_keys():
    assert problems("train.lr=1e-3", "adapter.rank=4", "train.num_train_epochs=3") == [
        "unknown key 'train.lr' — did you mean 'train.learning_rate'?",
        "unknown key 'train.num_train_epochs' — did you mean 'train.epochs'?",
        "unknown key 'adapter.rank' — did you mean 'adapter.r'?"]


# The AdaLoRA block of the write-up "AdaLoRA Fine-Tuning Results for Intent Classification", pasted into a
# peftlab config: PEFT's own keys and keys of no library at all.
PASTED_ADALORA = {"method": "adalora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"],
                    "lora_dropout": 0.1, "bias": "none", "task_type": "SEQ_CLS", "init_lora_weights": True,
                    "use_rslora": False, "adaptive_scaling": True, "scale_factor": 1.0, "max_rank": 8,
                    "min_rank": 1, "update_steps": 100}
ADAPTER_KEYS = ("method, r, lora_alpha, lora_dropout, target_modules, bias, use_rslora, use_dora, init_lora_weights, "
                "modules_to_save, init_r, target_r, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight")


def test_a_pasted_peft_block_gives_one_problem_per_line_and_the_allowed_keys_once():
    assert message({"adapter": PASTED_ADALORA}, "seed-000.yaml") == "\n".join([
        "5 problems in seed-000.yaml:",
        "  unknown key 'adapter.adaptive_scaling'",
        "  unknown key 'adapter.scale_factor'",
        "  unknown key 'adapter.max_rank'",
        "  unknown key 'adapter.min_rank'",
        "  unknown key 'adapter.update_steps'",
        f"  (adapter keys: {ADAPTER_KEYS})"])
    # Without the made-up keys, PEFT's own (bias, task_type, init_lora_weights: true) load as they mean.
    real = {k: v for k, v in PASTED_ADALORA.items() if k not in
            ("adaptive_scaling", "scale_factor", "max_rank", "min_rank", "update_steps")}
    a = config.from_dict({"adapter": real}).adapter
    assert (a.method, a.bias, a.init_lora_weights, a.target_modules) == ("adalora", "none", "default", ["query", "value"])


def test_the_suggestion_cutoff_separates_slips_from_unrelated_keys():
    """Measured: every slip below gets its key, no key of that pasted block gets one (README: errors)."""
    fields = {s: [k.split(".", 1)[1] for k, _, _ in config.describe() if k.startswith(s + ".")]
              for s in ("train", "adapter", "data", "model")}
    slips = [("train", "lerning_rate"), ("train", "epocs"), ("train", "warmup"), ("train", "batchsize"),
             ("train", "num_epochs"), ("train", "eval_steps"), ("adapter", "dropout"), ("adapter", "lora_aplha"),
             ("adapter", "init_rank"), ("data", "text_column"), ("data", "validation_split"), ("data", "max_train_sample")]
    unrelated = [("adapter", k) for k in ("adaptive_scaling", "scale_factor", "max_rank", "min_rank", "update_steps")]

    def best(section, key):
        return max(difflib.SequenceMatcher(None, key, f).ratio() for f in fields[section])

    assert min(best(*s) for s in slips) >= SUGGESTION_CUTOFF > max(best(*u) for u in unrelated)
    for section, key in slips:
        assert "did you mean" in problems(f"{section}.{key}=1")[0], key


def test_peft_keys_are_taken_or_explained():
    assert config.load(overrides=["adapter.bias=lora_only"]).adapter.bias == "lora_only"
    assert config.load(overrides=["adapter.task_type=seq_cls", "adapter.inference_mode=false"]).adapter.method == "lora"
    assert problems("adapter.task_type=CAUSAL_LM") == [
        "adapter.task_type: peftlab trains sequence classifiers, always task_type SEQ_CLS (got 'CAUSAL_LM'); remove the key"]
    assert problems("adapter.init_lora_weights=false") == [
        "adapter.init_lora_weights: false (PEFT's random non-zero start, meant for its tests) is not offered; use "
        "default, gaussian, pissa or olora"]
    assert problems("adapter.total_step=100") == [
        "adapter.total_step: peftlab counts AdaLoRA's total_step itself (optimizer steps from train.epochs, "
        "train.batch_size and the data); remove the key"]
    assert problems("adapter.bias=some") == [
        "adapter.bias: expected one of none, all, lora_only, got 'some'"]


def test_wrong_type_names_expected_type():
    assert problems("train.epochs=three") == ["train.epochs: expected an integer, got 'three'"]
    assert problems("train.seed=1.5") == ["train.seed: expected an integer, got 1.5"]
    assert problems("adapter.use_rslora=maybe") == ["adapter.use_rslora: expected true or false, got 'maybe'"]


def test_bad_choice_lists_allowed_values_with_did_you_mean():
    assert problems("adapter.method=lorra") == [
        "adapter.method: expected one of full, lora, adalora, dora, got 'lorra' — did you mean 'lora'?"]


def test_impossible_combinations_are_reported_together():
    overrides = ["adapter.method=adalora", "adapter.use_dora=true", "adapter.target_r=20", "train.epochs=x"]
    with pytest.raises(ConfigError) as e:
        config.load(overrides=overrides)
    assert str(e.value) == "\n".join([
        "3 config problems:",
        "  train.epochs: expected an integer, got 'x'",
        "  adapter.use_dora: AdaLoRA does not support DoRA — use method=dora or method=adalora alone",
        "  adapter.target_r (20) must not exceed adapter.init_r (12)"])


def test_a_config_file_names_itself_in_the_heading(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  epochs: 0\n  batch_size: 0\n")
    with pytest.raises(ConfigError) as e:
        config.load(f)
    assert str(e.value) == (f"2 problems in {f}:\n  train.epochs must be at least 1 (got 0)\n"
                            "  train.batch_size must be at least 1 (got 0)")


def test_adalora_schedule_must_fit_in_the_optimizer_steps():
    cfg = config.load(overrides=["adapter.method=adalora", "adapter.tinit=60", "adapter.tfinal=40"])
    with pytest.raises(ConfigError) as e:
        config.check_adalora_schedule(cfg.adapter, 100)
    assert str(e.value) == ("adapter.tinit + adapter.tfinal (60 + 40) must be less than the total optimizer steps "
                            "(100): lower them, or train for more steps (train.epochs, smaller train.batch_size)")
    assert config.check_adalora_schedule(cfg.adapter, 101) == (60, 40)
    auto = config.load(overrides=["adapter.method=adalora"]).adapter
    assert config.check_adalora_schedule(auto, 1000) == (100, 200)


def test_pissa_with_adalora_and_other_rules():
    assert problems("adapter.method=adalora", "adapter.init_lora_weights=pissa")[0].startswith(
        "adapter.init_lora_weights: pissa is a LoRA option")
    assert problems("data.train_file=x.csv") == ["data.test_file is required with data.train_file"]
    assert problems("adapter.lora_dropout=1.5") == ["adapter.lora_dropout must be in [0, 1) (got 1.5)"]
    assert problems("data.validation_size=0") == ["data.validation_size must be positive (got 0)"]


def test_overrides_parse_yaml_values_lists_and_scientific_notation():
    cfg = config.load(overrides=["adapter.target_modules=query,key,value", "train.learning_rate=1e-3",
                                 "data.text_columns=[title, description]", "data.max_train_examples=null"])
    assert cfg.adapter.target_modules == ["query", "key", "value"]
    assert cfg.train.learning_rate == 1e-3
    assert cfg.data.text_columns == ["title", "description"]
    with pytest.raises(ConfigError, match="is not key=value"):
        config.load(overrides=["train.epochs"])


def test_method_dora_sets_use_dora_and_round_trips(tmp_path):
    cfg = config.load(overrides=["adapter.method=dora"])
    assert cfg.adapter.use_dora
    f = tmp_path / "c.yaml"
    f.write_text(config.dump(cfg))
    assert config.load(f) == cfg


def test_every_location_becomes_absolute_for_the_run_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    monkeypatch.setenv("PEFTLAB_DATA_DIR", "d")
    cfg = config.with_absolute_paths(config.load(overrides=["model.name=m"]))
    assert (cfg.model.name, cfg.data.data_dir) == (str(tmp_path / "m"), str(tmp_path / "d"))
    files = config.with_absolute_paths(config.load(overrides=["data.train_file=a.csv", "data.test_file=../b.csv"]))
    assert (files.data.train_file, files.data.test_file) == (str(tmp_path / "a.csv"), str(tmp_path.parent / "b.csv"))
    assert config.with_absolute_paths(config.load()).model.name == "default"  # a name, not a folder


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file 'nope\.yaml' not found"):
        config.load("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        config.load(bad)


TRAIN_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("compare-"))
COMPARE_CONFIGS = sorted((REPO / "configs").glob("compare-*.yaml"))


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates_reads_as_written_and_documents_its_command(path):
    cfg = config.load(path)
    assert path.read_text().splitlines()[0] == f"# peftlab train configs/{path.name} --data-dir ../shared/data"
    loaded = config.dotted(config.to_dict(cfg))
    for key, value in config.dotted(yaml.safe_load(path.read_text())).items():  # no key dropped or renamed
        assert loaded[key] == value, key


@pytest.mark.parametrize("path", COMPARE_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_compare_config_validates_and_documents_its_command(path):
    from peftlab import matrix

    plan = matrix.load(path)  # every cell's Config is built and validated
    assert path.read_text().splitlines()[0] == f"# peftlab compare configs/{path.name} --data-dir ../shared/data"
    assert len(plan.cells) >= 2 and len({c.name for c in plan.cells}) == len(plan.cells)


def test_describe_lists_every_key_with_help_in_the_users_words():
    rows = config.describe()
    keys = {k for k, _, _ in rows}
    assert {"adapter.init_r", "train.learning_rate", "data.text_columns", "adapter.bias"} <= keys
    assert all(help_text for _, _, help_text in rows)
    assert not [k for k, _, text in rows if "seed 0" in text or "the seeds" in text]  # users never saw those
