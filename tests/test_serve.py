"""peftlab serve: two adapters on one base, answers equal to Predictor.predict, micro-batching of
concurrent requests, one-line 4xx errors (never 5xx), and which folders get served."""

import asyncio
import json
import logging
import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx
from fastapi.testclient import TestClient

from peftlab import cli
from peftlab.config import ServeLimits
from peftlab.errors import ConfigError, RunError
from peftlab.server import create_app, read_config

NAMES = ("alpha", "beta")
LIMITS = ServeLimits(max_texts_per_request=8, max_chars_per_text=300, max_body_bytes=4000, max_wait_ms=20)


@pytest.fixture(scope="module")
def runs(lora_pair):
    return lora_pair


@pytest.fixture(scope="module")
def app(runs):
    return create_app({n: runs / n for n in NAMES}, LIMITS)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def texts(small_data):
    import pandas as pd

    return [*pd.read_csv(small_data["test"]).text.tolist()[:21], "", "💳 ñ " * 10, "card " * 60]


@pytest.fixture(scope="module")
def expected(runs, texts):
    """Every label's score per text, from each run loaded on its own (no sharing, no batching)."""
    from peftlab.workflows import predict

    return {n: [dict(r["top_k"]) for r in predict(runs / n, texts, top_k=6)] for n in NAMES}


def check(result: dict, want: dict[str, float]) -> None:
    """Scores within 1e-5 for every label; the top label is the reference's (or tied with it)."""
    assert len(result["top_k"]) == len(want)
    got = {x["label"]: x["score"] for x in result["top_k"]}
    assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-5 for k in want)
    assert result["label"] == result["top_k"][0]["label"] and result["score"] == result["top_k"][0]["score"]
    assert want[result["label"]] >= max(want.values()) - 1e-5
    assert [x["score"] for x in result["top_k"]] == sorted(got.values(), reverse=True)


def test_adapters_share_one_base_model(app, client):
    preds = app.state.predictors
    assert preds["alpha"].model is preds["beta"].model
    assert {preds[n].adapter_name for n in NAMES} == set(NAMES)
    listed = client.get("/v1/adapters").json()["adapters"]
    assert [a["name"] for a in listed] == list(NAMES) and len({a["base"] for a in listed}) == 1
    assert client.get("/healthz").json()["base_models"] == 1


@pytest.mark.parametrize("name", NAMES)
def test_answers_equal_predict(client, texts, expected, name):
    results = []
    for i in range(0, len(texts), 8):
        r = client.post("/v1/classify", json={"texts": texts[i:i + 8], "adapter": name, "top_k": 6})
        assert r.status_code == 200, r.text
        assert r.json()["adapter"] == name
        results += r.json()["results"]
    assert len(results) == len(texts)
    for result, want in zip(results, expected[name], strict=True):
        check(result, want)
    one = client.post("/v1/classify", json={"texts": texts[:2], "adapter": name}).json()["results"]
    assert [len(x["top_k"]) for x in one] == [1, 1]  # top_k defaults to 1


def test_the_two_adapters_answer_differently(client, texts):
    scores = [[x["score"] for x in client.post("/v1/classify", json={"texts": texts[:4], "adapter": n}).json()["results"]]
              for n in NAMES]
    assert scores[0] != scores[1]


def test_concurrent_requests_are_batched_and_correct(app, texts, expected):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as c:
            before = (await c.get("/healthz")).json()
            same = await asyncio.gather(*[c.post("/v1/classify", json={"texts": [texts[i]], "adapter": "alpha",
                                                                       "top_k": 6}) for i in range(16)])
            middle = (await c.get("/healthz")).json()
            jobs = [(NAMES[i % 2], [i % len(texts), (i + 5) % len(texts)]) for i in range(20)]
            mixed = await asyncio.gather(*[c.post("/v1/classify", json={"texts": [texts[j] for j in idx], "adapter": n,
                                                                        "top_k": 6}) for n, idx in jobs])
            after = (await c.get("/healthz")).json()
        return before, same, middle, jobs, mixed, after

    before, same, middle, jobs, mixed, after = asyncio.run(go())
    assert all(r.status_code == 200 for r in same + mixed)
    for i, r in enumerate(same):
        check(r.json()["results"][0], expected["alpha"][i])
    assert middle["requests"] - before["requests"] == 16 and middle["texts"] - before["texts"] == 16
    assert middle["batches"] - before["batches"] < 16, "16 concurrent requests should share model calls"
    assert middle["largest_batch_texts"] > 1
    for (name, idx), r in zip(jobs, mixed, strict=True):
        assert r.json()["adapter"] == name
        for result, j in zip(r.json()["results"], idx, strict=True):
            check(result, expected[name][j])
    assert after["requests"] - middle["requests"] == 20 and after["batches"] - middle["batches"] < 20


@pytest.mark.parametrize("body,status,message", [
    ('{"texts": ["a"', 422, "malformed JSON"),
    ("[]", 422, "body: "),
    ('{"texts": [1], "adapter": "alpha"}', 422, "texts.0: Input should be a valid string"),
    ('{"texts": "abc", "adapter": "alpha"}', 422, "texts: Input should be a valid list"),
    ('{"texts": [], "adapter": "alpha"}', 422, "texts: List should have at least 1 item"),
    ('{"texts": ["a"], "adapter": "alpha", "top_k": "2"}', 422, "top_k: Input should be a valid integer"),
    ('{"texts": ["a"], "adapter": "alpha", "top_k": 0}', 422, "top_k: Input should be greater than or equal to 1"),
    ('{"texts": ["a"], "adapter": "alpha", "top_k": 7}', 422, "top_k: 7 is more than adapter 'alpha' has labels (6)"),
    ('{"text": ["a"], "adapter": "alpha"}', 422, "texts: Field required (and 1 more)"),
    ('{"texts": ["a"]}', 422, "adapter: required when several are loaded (alpha, beta)"),
    ('{"texts": ["a"], "adapter": 3}', 422, "adapter: Input should be a valid string"),
    (json.dumps({"texts": ["a"] * 9, "adapter": "alpha"}), 422, "texts: 9 texts, the limit is 8 per request"),
    (json.dumps({"texts": ["a", "b" * 301], "adapter": "alpha"}), 422, "texts.1: 301 characters, the limit is 300"),
    (json.dumps({"texts": ["a" * 290] * 14, "adapter": "alpha"}), 413, "request body over 4000 bytes"),
    ('{"texts": ["a"], "adapter": "gamma"}', 404, "unknown adapter 'gamma' (loaded: alpha, beta)"),
    ('{"texts": ["a"], "adapter": "../alpha"}', 422, "adapter: String should match pattern"),
    ('{"texts": ["a"], "adapter": "/etc/passwd"}', 422, "adapter: String should match pattern"),
    ('{"texts": ["a"], "adapter": "a/b"}', 422, "adapter: String should match pattern"),
    ('{"texts": ["a"], "adapter": ".."}', 422, "adapter: String should match pattern"),
    ('{"texts": ["a"], "adapter": ""}', 422, "adapter: String should match pattern"),
    (json.dumps({"texts": ["a"], "adapter": "a" * 65}), 422, "adapter: String should match pattern"),
])
def test_bad_requests_are_one_line_4xx(client, body, status, message):
    r = client.post("/v1/classify", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert list(r.json()) == ["error"] and message in error and "\n" not in error


def test_body_size_is_checked_on_the_bytes_that_arrive(client):
    # A chunked upload has no Content-Length: the limit must hold on what is actually received.
    r = client.post("/v1/classify", content=iter([b'{"texts": ["', b"a" * 3000, b"a" * 3000, b'"]}']),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json() == {"error": "request body over 4000 bytes"}
    ok = client.post("/v1/classify", content=iter([b'{"texts": ["a"], ', b'"adapter": "beta"}']),
                     headers={"content-type": "application/json"})
    assert ok.status_code == 200 and ok.json()["adapter"] == "beta"


def test_wrong_method_route_and_content_type_are_json_4xx(client):
    assert client.get("/v1/classify").json() == {"error": "Method Not Allowed"}
    assert client.get("/v1/nothing").status_code == 404
    r = client.post("/v1/classify", content="alpha", headers={"content-type": "text/plain"})
    assert r.status_code == 422 and "error" in r.json()


def test_adapters_healthz_and_openapi(client, runs):
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    a = listed["alpha"]
    assert a["kind"] == "torch" and a["num_labels"] == 6 and len(a["labels"]) == 6 and a["source"] == str(runs / "alpha")
    assert a["requests"] >= 1 and a["batches"] >= 1
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["adapters"] == 2 and h["limits"]["max_texts_per_request"] == 8
    spec = client.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/adapters", "/healthz"} <= set(spec["paths"])
    assert "ClassifyRequest" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_one_adapter_needs_no_name(runs):
    with TestClient(create_app({"alpha": runs / "alpha"})) as c:
        r = c.post("/v1/classify", json={"texts": ["card"]})
        assert r.status_code == 200 and r.json()["adapter"] == "alpha"


def test_a_failing_model_call_is_a_json_500_and_the_worker_survives():
    import numpy as np

    from peftlab.labels import LabelMap
    from peftlab.predictor import Predictor

    class Flaky:  # stands in for an onnxruntime session: fails on the text "boom"
        def run(self, names, feeds):
            if feeds["input_ids"].shape[1] > 3:
                raise RuntimeError("model failed")
            return [np.zeros((len(feeds["input_ids"]), 2), dtype=np.float32)]

    class Tokenizer:
        pad_token_id = 0

        def __call__(self, texts, truncation, max_length):
            return {"input_ids": [[1] * (1 + len(t)) for t in texts]}

    fake = Predictor(Flaky(), Tokenizer(), LabelMap(["no", "yes"]), 16, kind="onnx", source="fake")
    with TestClient(create_app({}, predictors={"fake": fake}), raise_server_exceptions=False) as c:
        r = c.post("/v1/classify", json={"texts": ["boom"]})
        assert r.status_code == 500 and r.json() == {"error": "internal error: RuntimeError"}
        r = c.post("/v1/classify", json={"texts": ["ok"], "top_k": 2})
        assert r.status_code == 200 and [x["score"] for x in r.json()["results"][0]["top_k"]] == [0.5, 0.5]


def test_dir_mode_skips_unfinished_runs(runs, tmp_path, caplog):
    shutil.copytree(runs / "alpha", tmp_path / "alpha")
    shutil.copytree(runs / "beta", tmp_path / "unfinished")
    (tmp_path / "unfinished" / "summary.json").unlink()
    (tmp_path / "notes").mkdir()
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        adapters, limits = read_config(tmp_path)
    assert adapters == {"alpha": tmp_path / "alpha"} and limits == {}
    assert "did not finish" in caplog.text and "unfinished" in caplog.text
    assert read_config(tmp_path / "alpha") == ({"alpha": tmp_path / "alpha"}, {})  # one run folder
    with pytest.raises(ConfigError, match="no finished run or export folders"):
        read_config(tmp_path / "notes")


def test_config_file_refuses_unfinished_runs_and_bad_limits(runs, tmp_path, capsys):
    shutil.copytree(runs / "beta", tmp_path / "unfinished")
    (tmp_path / "unfinished" / "summary.json").unlink()
    good = tmp_path / "serve.yaml"
    good.write_text(f"adapters:\n  first: {runs / 'alpha'}\n  second: {runs / 'beta'}\nlimits:\n  max_wait_ms: 2\n")
    assert read_config(good) == ({"first": runs / "alpha", "second": runs / "beta"}, {"max_wait_ms": 2})
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapters:\n  late: unfinished\n")  # relative to the file
    with pytest.raises(RunError, match="did not finish"):
        read_config(bad)
    assert cli.main(["serve", str(bad)]) == 2
    assert "error: run '" in capsys.readouterr().err
    bad.write_text(f"adapters:\n  ../x: {runs / 'alpha'}\n")
    with pytest.raises(ConfigError, match="must match"):
        read_config(bad)
    bad.write_text(f"adapters:\n  a: {runs / 'alpha'}\nlimits:\n  max_texts_per_requst: 3\n  max_wait_ms: -1\n")
    with pytest.raises(ConfigError) as e:
        read_config(bad)
    assert str(e.value) == (f"2 problems in {bad}:\n"
                            "  unknown key 'limits.max_texts_per_requst' — did you mean 'limits.max_texts_per_request'?\n"
                            "  limits.max_wait_ms must be a number >= 0, not -1")
