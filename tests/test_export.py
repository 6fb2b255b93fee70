"""export → reload → same predictions, for adapter, merged and ONNX; pipeline() reads our label names;
predict on an export; errors are one line."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_overrides

from peftlab import cli, predictor, workflows
from peftlab.errors import ExportError


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory, data_dir):
    """The embedded MiniLM with a short LoRA run on Banking77: real weights, real predictions."""
    out = tmp_path_factory.mktemp("minilm")
    args = ["train", f"data.data_dir={data_dir}", "data.max_train_examples=1232", "data.max_test_examples=231",
            "data.validation_size=77", "train.epochs=2", f"output_dir={out}", "run_name=lora"]
    assert cli.main(args) == 0
    return out / "lora"


@pytest.fixture(scope="module")
def sample(data_dir):
    test = pd.read_csv(data_dir / "banking77" / "test.csv").sample(n=200, random_state=1)
    return test.text.tolist()


def _plain_onnx_logits(folder, texts, max_length):
    """Logits straight from onnxruntime and the saved tokenizer: no peftlab code in the path."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return session.run(["logits"], {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})[0]


def test_every_format_reproduces_the_run_on_banking77(minilm_run, sample, tmp_path):
    reference = workflows.predict(minilm_run, sample, top_k=1)
    ref_logits = predictor.load(minilm_run).logits(sample)
    for fmt in ("adapter", "merged", "onnx"):
        out = tmp_path / fmt
        assert cli.main(["export", str(minilm_run), "--format", fmt, "-o", str(out)]
                        + (["--quantize"] if fmt == "onnx" else [])) == 0
        record = json.loads((out / "export.json").read_text())
        parity = record["parity"]
        assert record["format"] == fmt and parity["examples"] == 231
        assert parity["label_agreement"] == 1.0 and parity["max_abs_logit_diff"] <= 1e-3
        assert parity["accuracy_export"] == parity["accuracy_reference"]
        got = workflows.predict(out, sample, top_k=1)
        assert [r["label"] for r in got] == [r["label"] for r in reference], fmt  # 100 % label agreement
        assert np.allclose([r["score"] for r in got], [r["score"] for r in reference], atol=1e-4)
    onnx_logits = _plain_onnx_logits(tmp_path / "onnx", sample, 64)
    assert float(np.abs(onnx_logits - ref_logits).max()) <= 1e-3
    q = json.loads((tmp_path / "onnx" / "export.json").read_text())["parity"]["int8"]
    # int8 weights move logits a little; the recorded check says how much, and accuracy both ways.
    assert 0 < q["max_abs_logit_diff"] < 1.0 and q["label_agreement"] > 0.75
    assert (tmp_path / "onnx" / "model.int8.onnx").stat().st_size < 0.5 * (tmp_path / "onnx" / "model.onnx").stat().st_size


def test_pipeline_loads_the_merged_export_with_our_label_names(minilm_run, sample, tmp_path):
    from transformers import pipeline

    out = tmp_path / "merged"
    from peftlab.exporting import export

    export(minilm_run, "merged", out)
    clf = pipeline("text-classification", model=str(out), device="cpu")
    got = clf(sample[:20], truncation=True, max_length=64)
    ours = predictor.load(minilm_run)
    ours.confidence = None  # the pipeline's scores are the plain softmax: compare before temperature scaling
    ours = ours.predict(sample[:20])
    names = set(json.loads((minilm_run / "labels.json").read_text())["id2label"].values())
    assert all(g["label"] in names for g in got)
    assert [g["label"] for g in got] == [o["label"] for o in ours]
    assert np.allclose([g["score"] for g in got], [o["score"] for o in ours], atol=1e-4)


@pytest.mark.parametrize("method", ["adalora", "full", "dora"])
def test_merged_and_onnx_exports_of_other_methods(method, tiny_model, small_data, tmp_path):
    extra = {"train.epochs": 2, "adapter.deltaT": 1} if method == "adalora" else {"train.epochs": 1}
    assert cli.main(["train", *tiny_overrides(tiny_model, small_data, tmp_path, method, **extra)]) == 0
    run = tmp_path / method
    texts = pd.read_csv(small_data["test"]).text.tolist()
    ref = predictor.load(run).logits(texts)
    from peftlab.exporting import export

    for fmt in ("merged", "onnx"):
        out = export(run, fmt, tmp_path / f"{method}-{fmt}")
        got = predictor.load(out).logits(texts)
        assert float(np.abs(got - ref).max()) <= 1e-4, fmt
        assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_export_mistakes_are_one_line_errors(tiny_model, small_data, tmp_path, capsys):
    assert cli.main(["train", *tiny_overrides(tiny_model, small_data, tmp_path, "full", **{"train.epochs": 1})]) == 0
    run = tmp_path / "full"
    assert cli.main(["export", str(run), "--format", "adapter"]) == 2
    assert "is full fine-tuning and has no adapter; use --format merged or onnx" in capsys.readouterr().err
    assert cli.main(["export", str(run), "--format", "merged", "--quantize"]) == 2
    assert "--quantize applies to --format onnx only" in capsys.readouterr().err
    out = tmp_path / "exp"
    assert cli.main(["export", str(run), "--format", "merged", "-o", str(out)]) == 0
    before = (out / "model.safetensors").read_bytes()
    assert cli.main(["export", str(run), "--format", "merged", "-o", str(out)]) == 2
    assert "already exists; choose another --output or pass --force" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before  # the earlier export is intact
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        from peftlab.exporting import export

        export(run, "tflite")
    with pytest.raises(SystemExit):  # argparse rejects a wrong --format with exit code 2 too
        cli.main(["export", str(run), "--format", "tflite"])
