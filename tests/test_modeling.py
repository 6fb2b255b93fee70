"""Target-module resolution per architecture, newly initialised weights, parameter accounting."""

import pytest
from transformers import AutoConfig, AutoModelForSequenceClassification

from peftlab.config import AdapterConfig, ModelConfig
from peftlab.errors import ConfigError
from peftlab.modeling import (
    AUTO_TARGETS,
    build,
    format_parameters,
    linear_layer_names,
    resolve_backbone,
    resolve_target_modules,
)

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100,
            max_position_embeddings=64, pad_token_id=0)


def tiny(model_type):
    kw = dict(TINY)
    if model_type == "distilbert":
        kw = dict(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=100, max_position_embeddings=64, pad_token_id=0)
    if model_type == "modernbert":
        kw.update(global_attn_every_n_layers=1, local_attention=16)
    return AutoModelForSequenceClassification.from_config(AutoConfig.for_model(model_type, num_labels=3, **kw))


@pytest.mark.parametrize("model_type", ["bert", "roberta", "mpnet", "distilbert", "deberta-v2", "electra", "modernbert"])
def test_auto_targets_exist_in_each_architecture(model_type):
    model = tiny(model_type)
    targets = resolve_target_modules(model, "auto", ["classifier"])
    assert targets == AUTO_TARGETS[model_type]
    assert set(targets) <= set(linear_layer_names(model))


def test_unknown_target_lists_the_models_linear_layers():
    with pytest.raises(ConfigError) as e:
        resolve_target_modules(tiny("bert"), ["q_proj"], ["classifier"])
    assert str(e.value) == ("adapter.target_modules: q_proj not found in this model; its linear layers are: "
                            "dense, key, query, value")


def test_all_linear_and_explicit_lists_pass_through():
    model = tiny("mpnet")
    assert resolve_target_modules(model, "all-linear", []) == "all-linear"
    assert resolve_target_modules(model, ["q", "k", "v"], []) == ["q", "k", "v"]


def test_auto_on_an_unknown_architecture_names_the_fix():
    model = tiny("bert")
    model.config.model_type = "mystery"
    with pytest.raises(ConfigError, match=r"does not know model type 'mystery'; name the modules"):
        resolve_target_modules(model, "auto", [])


def test_backbone_resolution(tmp_path, monkeypatch):
    assert resolve_backbone("default").endswith("model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        resolve_backbone(str(tmp_path / "empty"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_backbone("m") == str(tmp_path / "m")  # absolute: runs reload from any directory
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="is not a local folder and the hub is offline"):
        resolve_backbone("bert-base-uncased")


def test_embedded_model_parameter_accounting_matches_the_seeds_format():
    labels = {i: f"l{i}" for i in range(77)}
    model, _tok, details = build(ModelConfig(), AdapterConfig(method="lora"), labels)
    assert details["newly_initialised"] == ["classifier"]  # all-MiniLM ships its pooler
    trainable, total = model.get_nb_trainable_parameters()
    # LoRA r=8 on query+value in 6 layers + the 384×77 head.
    assert trainable == 6 * 2 * 8 * (384 + 384) + 384 * 77 + 77
    assert format_parameters(trainable, total) == f"{trainable:,} / {total:,} ({100 * trainable / total:.2f}%)"
    assert trainable / total < 0.01
