"""Config contracts: exact user-facing messages, all problems at once, every shipped config valid."""

from pathlib import Path

import pytest

from peftlab import config
from peftlab.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def problems(*overrides):
    with pytest.raises(ConfigError) as e:
        config.load(overrides=list(overrides))
    return e.value.problems


def test_defaults_are_valid_and_resolve_the_method_learning_rate():
    cfg = config.load()
    assert cfg.adapter.method == "lora" and cfg.model.name == "default"
    assert cfg.learning_rate == config.DEFAULT_LEARNING_RATE["lora"]
    assert config.load(overrides=["adapter.method=full"]).learning_rate == config.DEFAULT_LEARNING_RATE["full"]
    assert config.load(overrides=["train.learning_rate=5e-4"]).learning_rate == 5e-4


def test_unknown_key_names_the_key_and_suggests_the_near_miss():
    (p,) = problems("train.lerning_rate=1e-3")
    assert p.startswith("unknown key 'train.lerning_rate' — did you mean 'train.learning_rate'? (allowed: epochs,")


def test_unknown_section():
    (p,) = problems("trian.epochs=3")
    assert p.startswith("unknown key 'trian' — did you mean 'train'?")


def test_wrong_type_names_expected_type():
    assert problems("train.epochs=three") == ["train.epochs: expected an integer, got 'three'"]
    assert problems("train.seed=1.5") == ["train.seed: expected an integer, got 1.5"]
    assert problems("adapter.use_rslora=maybe") == ["adapter.use_rslora: expected true or false, got 'maybe'"]


def test_bad_choice_lists_allowed_values_with_did_you_mean():
    assert problems("adapter.method=lorra") == [
        "adapter.method: expected one of full, lora, adalora, dora, got 'lorra' — did you mean 'lora'?"]


def test_impossible_combinations_are_reported_together():
    ps = problems("adapter.method=adalora", "adapter.use_dora=true", "adapter.target_r=20", "train.epochs=x")
    assert ps == [
        "train.epochs: expected an integer, got 'x'",
        "adapter.use_dora: AdaLoRA does not support DoRA — use method=dora or method=adalora alone",
        "adapter.target_r (20) must not exceed adapter.init_r (12)",
    ]
    with pytest.raises(ConfigError, match=r"^3 config problems: train\.epochs"):
        config.load(overrides=["adapter.method=adalora", "adapter.use_dora=true", "adapter.target_r=20",
                               "train.epochs=x"])


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
def test_every_shipped_config_validates_and_documents_its_command(path):
    cfg = config.load(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# peftlab train configs/"), "first line: the command that runs it"
    assert cfg.adapter.method in config.METHODS


@pytest.mark.parametrize("path", COMPARE_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_compare_config_validates_and_documents_its_command(path):
    from peftlab import compare

    plan = compare.load(path)  # every cell's Config is built and validated
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# peftlab compare configs/{path.name}"), "first line: the command that runs it"
    assert len(plan.cells) >= 2 and {c.config.adapter.method for c in plan.cells} <= set(config.METHODS)


def test_describe_lists_every_key_with_help():
    rows = config.describe()
    keys = {k for k, _, _ in rows}
    assert {"adapter.init_r", "train.learning_rate", "data.text_columns"} <= keys
    assert all(help_text for _, _, help_text in rows)
