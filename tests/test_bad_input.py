"""The bad-input catalogue (docs/bad-input.md): each case gets a one-line error that names the problem
(exit code 2 on the CLI, a 4xx with a JSON error over HTTP), and leaves earlier results intact.

The catalogue in docs/ lists exactly these cases with the message peftlab prints today; regenerate it
with ``python tests/test_bad_input.py`` after changing a message.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, tiny_overrides

from peftlab import cli

CATALOGUE = REPO / "docs" / "bad-input.md"


@dataclass
class Case:
    id: str
    area: str       # config, data, cli, http
    input: str      # what the user gave, in words
    expect: str     # a fragment the one-line message must contain
    argv: object = None     # env -> argv for peftlab (config, data, cli)
    request: object = None  # env -> (method, path, kwargs) for the HTTP API
    status: int = 0         # HTTP status expected


def train(env, *over, data: str | None = None, test: str | None = None) -> list[str]:
    """peftlab train on the tiny model; data/test name files in env['data'] (default: the good ones)."""
    d = dict(env["good"])
    if data:
        d["train"] = env["data"] / data
    if test:
        d["test"] = env["data"] / test
    args = tiny_overrides(env["model"], d, env["runs"], "lora", run_name="new", **{"train.epochs": 1})
    return ["train", *args, *over]


CASES = [
    # --- config ---------------------------------------------------------------------------------------
    Case("unknown-key", "config", "`train.epocs=3`", "unknown key 'train.epocs' — did you mean 'train.epochs'?",
         argv=lambda e: train(e, "train.epocs=3")),
    Case("wrong-type", "config", "`train.epochs=three`", "train.epochs", argv=lambda e: train(e, "train.epochs=three")),
    Case("bad-choice", "config", "`adapter.method=lora2`", "did you mean 'lora'?",
         argv=lambda e: train(e, "adapter.method=lora2")),
    Case("several-problems", "config", "`train.epocs=3 adapter.method=lora2` (all reported at once)",
         "2 config problems", argv=lambda e: train(e, "train.epocs=3", "adapter.method=lora2")),
    Case("adalora-schedule", "config", "AdaLoRA `tinit=50 tfinal=50` on a 14-step run", "tinit",
         argv=lambda e: train(e, "adapter.method=adalora", "adapter.tinit=50", "adapter.tfinal=50")),
    Case("target-r-above-init-r", "config", "AdaLoRA `target_r=16 init_r=8`", "target_r",
         argv=lambda e: train(e, "adapter.method=adalora", "adapter.target_r=16", "adapter.init_r=8")),
    Case("dora-with-adalora", "config", "`adapter.method=adalora adapter.use_dora=true`", "use_dora",
         argv=lambda e: train(e, "adapter.method=adalora", "adapter.use_dora=true")),
    Case("non-positive-batch", "config", "`train.batch_size=0`", "train.batch_size",
         argv=lambda e: train(e, "train.batch_size=0")),
    Case("missing-model-path", "config", "`model.name=./no-such-model`", "no-such-model",
         argv=lambda e: train(e, "model.name=./no-such-model")),
    Case("missing-config-file", "config", "`peftlab train nosuch.yaml`", "nosuch.yaml",
         argv=lambda e: ["train", str(e["data"] / "nosuch.yaml")]),
    Case("malformed-yaml", "config", "a YAML file with a syntax error", "bad.yaml",
         argv=lambda e: ["train", str(e["data"] / "bad.yaml")]),
    Case("yaml-not-a-mapping", "config", "a YAML file holding a list", "list.yaml",
         argv=lambda e: ["train", str(e["data"] / "list.yaml")]),
    Case("override-without-value", "config", "`train.epochs` (no `=`)", "train.epochs",
         argv=lambda e: train(e, "train.epochs")),
    Case("pasted-peft-block", "config", "an AdaLoRA block pasted from a notebook's PEFT config, with keys PEFT "
         "never had", "5 problems in", argv=lambda e: ["train", str(e["data"] / "peft_block.yaml"), *train(e)[1:]]),
    Case("known-intents-out-of-range", "config", "`data.known_intents=1.5`", "data.known_intents must be a fraction",
         argv=lambda e: train(e, "data.known_intents=1.5")),
    Case("keep-in-scope-zero", "config", "`ood.keep_in_scope=0`", "ood.keep_in_scope",
         argv=lambda e: train(e, "ood.keep_in_scope=0")),
    Case("unknown-ood-method", "config", "`ood.method=mahalanobis2`", "did you mean 'mahalanobis'?",
         argv=lambda e: train(e, "ood.method=mahalanobis2")),
    # --- data -----------------------------------------------------------------------------------------
    Case("oos-label-absent", "data", "`data.oos_label=oos` on data without that label", "data.oos_label 'oos' occurs in no split",
         argv=lambda e: train(e, "data.oos_label=oos")),
    Case("known-intents-too-few", "data", "`data.known_intents=0.2` of 6 intents (keeps 1)", "at least 2",
         argv=lambda e: train(e, "data.known_intents=0.2")),
    Case("missing-file", "data", "`data.train_file` that does not exist", "nosuch.csv",
         argv=lambda e: train(e, data="nosuch.csv")),
    Case("missing-text-column", "data", "CSV without the text column", "text", argv=lambda e: train(e, data="no_text.csv")),
    Case("missing-label-column", "data", "CSV without the label column", "category",
         argv=lambda e: train(e, data="no_label.csv")),
    Case("empty-file", "data", "a 0-byte CSV", "empty", argv=lambda e: train(e, data="empty.csv")),
    Case("header-only", "data", "a CSV with a header and no rows", "no rows", argv=lambda e: train(e, data="header.csv")),
    Case("wrong-encoding", "data", "a Latin-1 CSV", "UTF-8", argv=lambda e: train(e, data="latin1.csv")),
    Case("duplicate-header", "data", "a CSV whose header names `text` twice", "duplicate",
         argv=lambda e: train(e, data="dup_header.csv")),
    Case("labels-only-in-test", "data", "test labels never seen in training", "test",
         argv=lambda e: train(e, test="unseen_test.csv")),
    Case("huge-text", "data", "one 10 MB text (an unclosed quote swallows the file)", "characters",
         argv=lambda e: train(e, data="huge.csv")),
    Case("mixed-label-types", "data", "JSONL labels `1` and `\"refund\"` in one column", "mixes",
         argv=lambda e: train(e, "data.label_column=category", data="mixed.jsonl")),
    Case("malformed-jsonl", "data", "a JSONL file with a broken line", "could not be parsed",
         argv=lambda e: train(e, data="broken.jsonl")),
    Case("unsupported-format", "data", "an `.xlsx` training file", ".xlsx", argv=lambda e: train(e, data="data.xlsx")),
    Case("all-texts-empty", "data", "every text blank", "no rows with text", argv=lambda e: train(e, data="blank.csv")),
    Case("one-label", "data", "training data with a single label", "one label", argv=lambda e: train(e, data="one.csv", test="one.csv")),
    Case("missing-data-dir", "data", "`data.dataset=banking77` with a data dir that lacks it", "banking77",
         argv=lambda e: ["train", "data.dataset=banking77", f"data.data_dir={e['data'] / 'nowhere'}",
                         f"output_dir={e['runs']}"]),
    # --- cli ------------------------------------------------------------------------------------------
    Case("missing-run", "cli", "`peftlab evaluate` on a folder that does not exist", "not found",
         argv=lambda e: ["evaluate", str(e["runs"] / "nosuch")]),
    Case("foreign-folder", "cli", "`peftlab info` on a Trainer output folder", "not a peftlab run folder",
         argv=lambda e: ["info", str(e["foreign"])]),
    Case("unfinished-run", "cli", "`peftlab export` of a run that did not finish", "did not finish",
         argv=lambda e: ["export", str(e["unfinished"]), "--format", "merged"]),
    Case("wrong-export-format", "cli", "`peftlab export RUN --format tflite`", "invalid choice: 'tflite'",
         argv=lambda e: ["export", str(e["done"]), "--format", "tflite"]),
    Case("export-exists", "cli", "`peftlab export` onto an existing folder", "--force",
         argv=lambda e: ["export", str(e["done"]), "--format", "adapter", "-o", str(e["data"])]),
    Case("predict-missing-input", "cli", "`peftlab predict RUN nosuch.csv`", "nosuch.csv",
         argv=lambda e: ["predict", str(e["done"]), str(e["data"] / "nosuch.csv"), "-o", str(e["data"] / "p.csv")]),
    Case("predict-no-text-column", "cli", "`peftlab predict` on a file without its text column", "text",
         argv=lambda e: ["predict", str(e["done"]), str(e["data"] / "no_text.csv"), "-o", str(e["data"] / "p.csv")]),
    Case("predict-threshold-out-of-range", "cli", "`peftlab predict RUN FILE --threshold 2` on an msp run",
         "out of range for the msp score",
         argv=lambda e: ["predict", str(e["done"]), str(e["good"]["test"]), "-o", str(e["data"] / "p.csv"),
                         "--threshold", "2"]),
    Case("data-changed-since-training", "cli", "`peftlab evaluate` of a run whose test file was edited since",
         "changed since training", argv=lambda e: ["evaluate", str(e["changed"])]),
    Case("evaluate-unknown-labels", "cli", "`peftlab evaluate --data` with labels the run never saw", "never saw",
         argv=lambda e: ["evaluate", str(e["done"]), "--data", str(e["data"] / "unseen_test.csv"),
                         "--label-column", "category"]),
    Case("unknown-option", "cli", "`peftlab info RUN --jsn`", "unrecognized arguments: --jsn",
         argv=lambda e: ["info", str(e["done"]), "--jsn"]),
    Case("serve-missing-folder", "cli", "`peftlab serve` on a folder that does not exist", "nosuch",
         argv=lambda e: ["serve", str(e["runs"] / "nosuch")]),
    Case("resume-finished", "cli", "`peftlab train --resume` of a finished run", "already finished",
         argv=lambda e: [*train(e), "run_name=done", "--resume"]),
    Case("compare-foreign-runs", "cli", "`peftlab compare --runs` with a folder that is not a run", "not a peftlab run",
         argv=lambda e: ["compare", "--runs", str(e["done"]), str(e["foreign"]), "-o", str(e["data"] / "cmp")]),
    # --- untrusted files (each would create a marker file if its code ran) ------------------------------
    Case("pickle-model-weights", "untrusted", "a model folder with only a pickled `pytorch_model.bin`", "safetensors",
         argv=lambda e: train(e, f"model.name={e['pickle_model']}")),
    Case("pickle-adapter-weights", "untrusted", "a run whose adapter is a pickled `adapter_model.bin`", "safetensors",
         argv=lambda e: ["evaluate", str(e["pickle_run"])]),
    Case("remote-code-model", "untrusted", "a model folder whose config asks for its own Python code", "trust_remote_code",
         argv=lambda e: train(e, f"model.name={e['remote_code_model']}")),
    # --- http -----------------------------------------------------------------------------------------
    Case("malformed-json", "http", "`{\"texts\": [` as the body", "JSON",
         request=lambda e: ("POST", "/v1/classify", {"content": b'{"texts": [', "headers": {"content-type": "application/json"}}),
         status=422),
    Case("texts-not-a-list", "http", "`{\"texts\": \"hello\"}`", "texts",
         request=lambda e: ("POST", "/v1/classify", {"json": {"texts": "hello"}}), status=422),
    Case("text-not-a-string", "http", "`{\"texts\": [42]}`", "texts",
         request=lambda e: ("POST", "/v1/classify", {"json": {"texts": [42]}}), status=422),
    Case("missing-texts", "http", "`{\"adapter\": \"done\"}`", "texts",
         request=lambda e: ("POST", "/v1/classify", {"json": {"adapter": "done"}}), status=422),
    Case("empty-texts", "http", "`{\"texts\": []}`", "texts",
         request=lambda e: ("POST", "/v1/classify", {"json": {"texts": []}}), status=422),
    Case("too-many-texts", "http", "9 texts where the limit is 8", "the limit is 8",
         request=lambda e: ("POST", "/v1/classify", {"json": {"texts": ["hi"] * 9}}), status=422),
    Case("text-too-long", "http", "one text of 301 characters where the limit is 300", "300",
         request=lambda e: ("POST", "/v1/classify", {"json": {"texts": ["x" * 301]}}), status=422),
    Case("body-too-large", "http", "a 5 kB body where the limit is 4 kB", "4000",
         request=lambda e: ("POST", "/v1/classify", {"json": {"texts": ["hi"], "pad": "x" * 5000}}), status=413),
    Case("bad-top-k", "http", "`top_k: 0`", "top_k",
         request=lambda e: ("POST", "/v1/classify", {"json": {"texts": ["hi"], "top_k": 0}}), status=422),
    Case("threshold-out-of-range", "http", "`threshold: 2` on an msp adapter (scores are probabilities)",
         "out of range for the msp score",
         request=lambda e: ("POST", "/v1/classify", {"json": {"texts": ["hi"], "threshold": 2}}), status=422),
    Case("threshold-not-a-number", "http", "`threshold: \"0.5\"`", "threshold",
         request=lambda e: ("POST", "/v1/classify", {"json": {"texts": ["hi"], "threshold": "0.5"}}), status=422),
    Case("unknown-adapter", "http", "`adapter: \"nosuch\"`", "nosuch",
         request=lambda e: ("POST", "/v1/classify", {"json": {"texts": ["hi"], "adapter": "nosuch"}}), status=404),
    Case("path-like-adapter", "http", "`adapter: \"../../etc/passwd\"`", "adapter",
         request=lambda e: ("POST", "/v1/classify", {"json": {"texts": ["hi"], "adapter": "../../etc/passwd"}}),
         status=422),
    Case("wrong-method", "http", "`GET /v1/classify`", "Method Not Allowed",
         request=lambda e: ("GET", "/v1/classify", {}), status=405),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model, small_data):
    """A finished run (results that must survive), an unfinished one, a foreign folder, bad data files."""
    root = tmp_path_factory.mktemp("bad-input")
    runs, data = root / "runs", root / "data"
    data.mkdir()
    args = tiny_overrides(tiny_model, small_data, runs, "lora", run_name="done",
                          **{"train.epochs": 1, "ood.method": "msp"})
    assert cli.main(["train", *args]) == 0
    train_df = pd.read_csv(small_data["train"])
    (data / "empty.csv").write_bytes(b"")
    (data / "header.csv").write_text("text,category\n")
    train_df.rename(columns={"text": "sentence"}).to_csv(data / "no_text.csv", index=False)
    train_df.rename(columns={"category": "intent"}).to_csv(data / "no_label.csv", index=False)
    latin = train_df.copy()
    latin.loc[0, "text"] = "café crème"
    latin.to_csv(data / "latin1.csv", index=False, encoding="latin-1")
    (data / "dup_header.csv").write_text("text,text,category\n" + "\n".join(
        f'"{t}","{t}",{c}' for t, c in zip(train_df.text, train_df.category, strict=True)) + "\n")
    test = pd.read_csv(small_data["test"])
    test.loc[:4, "category"] = "a_label_training_never_had"
    test.to_csv(data / "unseen_test.csv", index=False)
    huge = train_df.copy()
    huge.loc[3, "text"] = "unclosed " * 1_200_000  # 10.8 MB in one cell
    huge.to_csv(data / "huge.csv", index=False)
    mixed = train_df.copy().astype(object)
    mixed.loc[mixed.category == mixed.category.iloc[0], "category"] = 1
    mixed.to_json(data / "mixed.jsonl", orient="records", lines=True)
    lines = train_df.to_json(orient="records", lines=True).splitlines()
    lines[5] = lines[5][:20]
    (data / "broken.jsonl").write_text("\n".join(lines) + "\n")
    (data / "data.xlsx").write_bytes(b"PK\x03\x04 not really a spreadsheet")
    blank = train_df.copy()
    blank["text"] = "   "
    blank.to_csv(data / "blank.csv", index=False)
    one = train_df.copy()
    one["category"] = "only_one"
    one.to_csv(data / "one.csv", index=False)
    (data / "bad.yaml").write_text("train:\n  epochs: [3\n")
    (data / "peft_block.yaml").write_text(yaml.safe_dump({"adapter": {
        "method": "adalora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"], "lora_dropout": 0.1,
        "bias": "none", "task_type": "SEQ_CLS", "init_lora_weights": True, "use_rslora": False,
        "adaptive_scaling": True, "scale_factor": 1.0, "max_rank": 8, "min_rank": 1, "update_steps": 100}},
        sort_keys=False))
    # A run on data files of its own, whose test file is edited after training.
    own = {k: data / f"own_{k}.csv" for k in ("train", "test")}
    for k, f in own.items():
        shutil.copy(small_data[k], f)
    assert cli.main(["train", *tiny_overrides(tiny_model, own, runs, "lora", run_name="changed",
                                              **{"train.epochs": 1})]) == 0
    edited = pd.read_csv(own["test"])
    pd.concat([edited, edited.head(1)]).to_csv(own["test"], index=False)
    (data / "list.yaml").write_text("- train\n- epochs\n")
    foreign = root / "trainer-output"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "bert"}')
    (foreign / "trainer_state.json").write_text("{}")
    unfinished = runs / "unfinished"
    shutil.copytree(runs / "done", unfinished)
    (unfinished / "summary.json").unlink()
    # Untrusted files: the payloads would create MARKER when unpickled or imported.
    marker = root / "MARKER"
    evil = f"import pathlib; pathlib.Path({str(marker)!r}).touch()"
    pickle_model = root / "pickle-model"
    shutil.copytree(tiny_model, pickle_model)
    (pickle_model / "model.safetensors").unlink()
    (pickle_model / "pytorch_model.bin").write_bytes(pickle_payload(evil))
    pickle_run = root / "pickle-run"
    shutil.copytree(runs / "done", pickle_run)
    (pickle_run / "adapter" / "adapter_model.safetensors").unlink()
    (pickle_run / "adapter" / "adapter_model.bin").write_bytes(pickle_payload(evil))
    remote = root / "remote-code-model"
    shutil.copytree(tiny_model, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg.update(model_type="evilbert", auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                                "AutoModelForSequenceClassification": "modeling_evil.EvilModel"})
    (remote / "config.json").write_text(json.dumps(cfg))
    (remote / "modeling_evil.py").write_text(evil + "\n")
    return {"root": root, "runs": runs, "marker": marker, "pickle_model": pickle_model, "pickle_run": pickle_run,
            "remote_code_model": remote, "data": data, "done": runs / "done", "unfinished": unfinished,
            "foreign": foreign, "model": tiny_model, "good": small_data, "changed": runs / "changed"}


def pickle_payload(code: str) -> bytes:
    """A pickle that runs ``code`` when loaded — what a planted checkpoint looks like."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (exec, (code,))

    return pickle.dumps(Payload())


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(case: Case, env: dict, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in case.argv(env)])
    except SystemExit as e:  # argparse
        code = e.code
    # Progress and log lines may come first; the error comes last: one line, or a heading line followed by
    # one indented line per problem.
    lines = capsys.readouterr().err.rstrip().splitlines()
    starts = [i for i, x in enumerate(lines) if x.startswith("error: ")]
    if len(starts) != 1 or any("Traceback" in x for x in lines):
        return code, "\n".join(lines)
    return code, "\n".join(lines[starts[0]:])


@pytest.fixture(scope="module")
def client(env):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from peftlab.config import ServeLimits
    from peftlab.server import create_app

    limits = ServeLimits(max_texts_per_request=8, max_chars_per_text=300, max_body_bytes=4000)
    with TestClient(create_app({"done": env["done"]}, limits)) as c:
        yield c


@pytest.mark.parametrize("case", [c for c in CASES if c.area != "http"], ids=lambda c: c.id)
def test_cli_case(case, env, capsys):
    before = fingerprint(env["done"])
    try:
        code, err = run_cli(case, env, capsys)
        assert not (env["runs"] / "new" / "summary.json").exists(), "bad input trained a run"
    finally:
        shutil.rmtree(env["runs"] / "new", ignore_errors=True)
    assert code == 2, err
    assert err.startswith("error: ") and all(line.startswith("  ") for line in err.splitlines()[1:]), err
    assert case.expect in err, err
    assert fingerprint(env["done"]) == before  # the finished run is untouched
    assert not env["marker"].exists()  # no planted code ran


@pytest.mark.parametrize("case", [c for c in CASES if c.area == "http"], ids=lambda c: c.id)
def test_http_case(case, env, client):
    method, path, kwargs = case.request(env)
    r = client.request(method, path, **kwargs)
    assert r.status_code == case.status, r.text
    body = r.json()
    message = body.get("error") or body.get("detail")
    assert isinstance(message, str) and "\n" not in message and case.expect in message, body
    ok = client.post("/v1/classify", json={"texts": ["I lost my card"]})  # the service is unharmed
    assert ok.status_code == 200


def test_catalogue_lists_every_case_with_its_message(env, client, capsys):
    """docs/bad-input.md is this file's table, with the messages peftlab prints now."""
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    text = render(env, client, capsys)
    if os.environ.get("PEFTLAB_WRITE_CATALOGUE"):
        CATALOGUE.parent.mkdir(exist_ok=True)
        CATALOGUE.write_text(text)
    assert CATALOGUE.read_text() == text


def observed(case: Case, env, client, capsys) -> str:
    if case.area == "http":
        method, path, kwargs = case.request(env)
        r = client.request(method, path, **kwargs)
        body = r.json()
        return f"{r.status_code} `{body.get('error') or body.get('detail')}`"
    code, err = run_cli(case, env, capsys)
    # Temporary folders differ between runs: show them as <tmp>/name; one problem per line.
    return f"exit {code}: " + "<br>".join(f"`{line.strip()}`" for line in re.sub(str(env["root"]), "<tmp>", err).splitlines())


def render(env, client, capsys) -> str:
    lines = ["# Bad input: what peftlab says", "",
             "Every case below is a test in `tests/test_bad_input.py` (which also checks that this page is current;",
             "regenerate it with `python tests/test_bad_input.py`). Each gets one line that names the problem and",
             "the fix — exit code 2 on the command line, a 4xx with a JSON `error` over HTTP — and leaves earlier",
             "results intact: the test fingerprints a finished run before and after every case, and checks that",
             "the service still answers after every bad request.", ""]
    for area, title in (("config", "Config"), ("data", "Data"), ("cli", "Command line"),
                        ("untrusted", "Untrusted files"), ("http", "HTTP API")):
        lines += [f"## {title}", "", "| case | input | what peftlab answers |", "|---|---|---|"]
        for c in (c for c in CASES if c.area == area):
            lines.append(f"| `{c.id}` | {c.input} | {observed(c, env, client, capsys).replace('|', '&#124;')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ["PEFTLAB_WRITE_CATALOGUE"] = "1"
    sys.exit(pytest.main([__file__, "-q", "-k", "catalogue", "-p", "no:cacheprovider"]))
