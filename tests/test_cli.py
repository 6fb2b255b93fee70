"""The CLI: help for every command, predict's output format, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from conftest import REPO, tiny_overrides

from peftlab import cli

COMMANDS = ["train", "evaluate", "predict", "export", "serve", "info", "report", "compare", "keys"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, small_data):
    out = tmp_path_factory.mktemp("cli-runs")
    assert cli.main(["train", *tiny_overrides(tiny_model, small_data, out, "lora", **{"train.epochs": 1})]) == 0
    return out / "lora"


def peftlab(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "peftlab.cli", *map(str, args)], capture_output=True, text=True,
                          input=stdin, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_and_is_in_the_readme(command):
    r = peftlab(command, "--help")
    assert r.returncode == 0 and "usage: peftlab " + command in r.stdout
    assert f"peftlab {command}" in (REPO / "README.md").read_text()


def test_predict_writes_id_label_score(run, tmp_path):
    pd.DataFrame({"id": [101, 102, 103], "text": ["my card has not arrived", "exchange rate?", "top up failed"]}).to_csv(
        tmp_path / "in.csv", index=False)
    assert cli.main(["predict", str(run), str(tmp_path / "in.csv"), "-o", str(tmp_path / "out.csv"), "--top-k", "3"]) == 0
    out = pd.read_csv(tmp_path / "out.csv")
    assert list(out.columns) == ["id", "label", "score", "in_scope", "top_k"]  # no scorer: no ood_score
    assert out.in_scope.all()
    assert out.id.tolist() == [101, 102, 103]
    names = json.loads((run / "labels.json").read_text())["id2label"].values()
    assert set(out.label) <= set(names) and out.score.between(0, 1).all()
    top = [json.loads(x) for x in out.top_k]
    assert all(len(t) == 3 and t[0][0] == lab and t[0][1] >= t[1][1] >= t[2][1] for t, lab in zip(top, out.label, strict=False))


def test_predict_jsonl_without_id_column_numbers_rows(run, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert cli.main(["predict", str(run), str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1] and set(rows[0]) == {"id", "label", "score", "in_scope"}


def test_evaluate_and_info_print_metrics(run, capsys):
    assert cli.main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("accuracy ") and "precision" in out and "(60 examples)" in out
    assert cli.main(["info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["summary"]["method"] == "lora" and len(info["labels"]) == 6


@pytest.mark.parametrize("args,message", [
    (["train", "train.lerning_rate=1"], "error: unknown key 'train.lerning_rate' — did you mean 'train.learning_rate'?"),
    (["train", "missing.yaml"], "error: config file 'missing.yaml' not found"),
    (["train", "adapter.method=adalora", "adapter.target_r=20"],
     "error: adapter.target_r (20) must not exceed adapter.init_r (12)"),
    (["evaluate", "/nonexistent/run"], "error: run folder '/nonexistent/run' not found"),
    (["info", str(REPO)], f"error: '{REPO}' is not a peftlab run folder (no config.yaml / labels.json)"),
    (["train", "data.data_dir=/nonexistent"], "error: dataset 'banking77' not found under '/nonexistent'"),
    (["train", "--data-dir", "/nonexistent", "train.lerning_rate=1"], "error: unknown key 'train.lerning_rate'"),
    (["train", str(REPO / "configs" / "banking77-lora.yaml"), "--data-dir", "/nonexistent", "train.epochs=2"],
     "error: dataset 'banking77' not found under '/nonexistent'"),
])
def test_user_mistakes_are_one_line_errors_with_exit_code_2(args, message):
    r = peftlab(*args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")


def test_unfinished_run_is_refused(run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "summary.json").unlink()
    r = peftlab("predict", broken, "-", "-o", tmp_path / "o.csv", stdin="hello\n")
    assert r.returncode == 2 and f"error: run '{broken}' did not finish (no summary.json)" in r.stderr


def test_existing_finished_run_is_never_overwritten(run, data_dir):
    r = peftlab("train", f"output_dir={run.parent}", f"run_name={run.name}", f"data.data_dir={data_dir}",
                "data.max_train_examples=100")
    assert r.returncode == 2 and "already holds a finished run" in r.stderr
