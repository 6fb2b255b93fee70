"""HTTP serving: many adapters on one base model, behind a small FastAPI app with micro-batching.

    POST /v1/classify   {"texts": [...], "adapter": "name", "top_k": 3}
    GET  /v1/adapters   what is loaded, with per-adapter counters
    GET  /healthz       liveness + batching counters

Predictors come from ``predictor.load_many`` (adapters on one backbone share one PeftModel); requests are
combined into model calls by microbatch.Batcher, on one model thread. Nothing touches the filesystem at
request time: adapter names are only looked up in the registry loaded at startup.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServeLimits, make_limits
from .errors import ConfigError, PeftlabError, RunError
from .files import read_yaml
from .microbatch import Batcher
from .predictor import SCORE_RANGES, check_threshold, load_many
from .rundir import CONFIG, EXPORT_RECORD, NAME, NAME_PATTERN, check_servable

log = logging.getLogger("peftlab")


# --- which folders to serve ------------------------------------------------------------------------

def read_config(path: str | Path) -> tuple[dict[str, Path], dict]:
    """({adapter name: folder}, limits dict) from a YAML file, a folder of runs, or one run folder.

    A YAML file lists ``adapters: {name: path}`` (relative to the file) and optional ``limits:``; a listed
    folder that is not servable is an error. A folder of runs serves each finished run or export
    subfolder under its folder name and skips the rest with a logged reason (a run still training must
    not stop the service from starting).
    """
    p = Path(path)
    if p.is_dir():
        if (p / EXPORT_RECORD).is_file() or (p / CONFIG).is_file():  # one run or export folder
            check_servable(p)
            if not NAME.match(p.name):
                raise ConfigError(f"folder name {p.name!r} is not a valid adapter name ({NAME_PATTERN}); "
                                  "use a YAML config to name it")
            return {p.name: p}, {}
        adapters = {}
        for sub in sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")):
            if not NAME.match(sub.name):
                log.warning("serve: skipping '%s': not a valid adapter name (%s)", sub, NAME_PATTERN)
                continue
            try:
                check_servable(sub)
            except RunError as e:
                log.warning("serve: skipping '%s': %s", sub, e)
                continue
            adapters[sub.name] = sub
        if not adapters:
            raise ConfigError(f"no finished run or export folders in '{p}'")
        return adapters, {}
    if not p.is_file():
        raise ConfigError(f"serve config '{p}' not found (give a YAML file, a run folder or a folder of runs)")
    data = read_yaml(p, "serve config")
    if not isinstance(data.get("adapters"), dict) or not data["adapters"] \
            or not isinstance(data.get("limits") or {}, dict) or set(data) - {"adapters", "limits"}:
        raise ConfigError(f"serve config '{p}' must hold 'adapters:' (a mapping of name: run or export folder) "
                          "and optionally 'limits:' (a mapping), nothing else")
    adapters, limits = {}, data.get("limits") or {}
    for name, src in data["adapters"].items():
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(f"serve config '{p}': adapter name {name!r} must match {NAME_PATTERN}")
        if not isinstance(src, str | Path):
            raise ConfigError(f"serve config '{p}': adapters.{name} must be a folder path")
        folder = Path(src).expanduser()
        folder = folder if folder.is_absolute() else p.parent / folder
        check_servable(folder)  # explicitly listed: an unfinished run is an error, not a skip
        adapters[name] = folder
    make_limits(limits, str(p))  # report bad limits before loading any model
    return adapters, limits


def _confidence_info(predictor) -> dict:
    conf = predictor.confidence
    if conf is None:
        return {"temperature": 1.0, "ood_method": "none", "ood_threshold": None}
    return {"temperature": conf.temperature, "ood_method": conf.method, "ood_threshold": conf.threshold}


# --- HTTP ------------------------------------------------------------------------------------------

class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo such as "text" is an error, not an ignored key

    texts: list[StrictStr] = Field(min_length=1, description="texts to classify (limits: GET /healthz)")
    adapter: str | None = Field(None, pattern=NAME_PATTERN,
                                description="adapter name from GET /v1/adapters; optional when only one is loaded")
    top_k: int = Field(1, ge=1, description="how many labels per text, best first (at most the number of labels)")
    threshold: float | None = Field(
        None, description="override the adapter's out-of-scope threshold on its ood_score (GET /v1/adapters shows "
                          "the scorer and its trained threshold)")

    @field_validator("threshold", mode="before")
    @classmethod
    def _json_number(cls, v):
        if isinstance(v, bool | str):
            raise PydanticCustomError("float_type", "Input should be a valid number")
        return v

    @field_validator("top_k", mode="before")
    @classmethod
    def _json_integer(cls, v):
        # JSON Schema's integer: 3 and 3.0, not "3" or true (pydantic's lax int would take those too).
        if isinstance(v, bool | str):
            raise PydanticCustomError("int_type", "Input should be a valid integer")
        return v


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="calibrated probability (softmax of the temperature-scaled logits)")


class TextResult(LabelScore):
    in_scope: bool = Field(description="false: the out-of-scope scorer rejected the text, whose label is then the "
                                       "out-of-scope label (top_k still lists the intents)")
    ood_score: float | None = Field(description="the deciding out-of-scope score (higher: more in scope); null when "
                                                "the adapter rejects nothing")
    top_k: list[LabelScore] = Field(description="the top_k best intents, best first")


class ClassifyResponse(BaseModel):
    adapter: str
    results: list[TextResult] = Field(description="one per input text, in input order")


class _BodyLimit:
    """Refuse bodies over ``max_bytes`` with 413: by Content-Length, and by counting what actually arrives
    (chunked uploads have no Content-Length, and a header can lie). Buffers at most ``max_bytes``."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = JSONResponse({"error": f"request body over {self.max_bytes} bytes"}, 413)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:  # refused before reading a byte
            return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size, more = size + len(chunks[-1]), message.get("more_body", False)
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect as usual
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


def _one_line(exc: RequestValidationError) -> str:
    """The first problem, as ``texts.0: Input should be a valid string (and 1 more)``."""
    errors = exc.errors() or [{"msg": "invalid request"}]
    e = errors[0]
    where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
    line = "malformed JSON" if e.get("type") == "json_invalid" else f"{where}: {e.get('msg', 'invalid value')}"
    return " ".join(line.split()) + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")


def create_app(adapters: dict[str, str | Path], limits: ServeLimits | None = None, predictors=None) -> FastAPI:
    """The app over ``adapters`` (name → run or export folder), loaded now, once (``predictors`` skips
    loading: already-loaded ``predictor.load_many`` output)."""
    limits = make_limits(asdict(limits)) if limits else ServeLimits()
    bad = [n for n in (predictors or adapters) if not NAME.match(n)]
    if bad:
        raise ConfigError(f"adapter name {bad[0]!r} must match {NAME_PATTERN}")
    if predictors is None:
        if not adapters:
            raise ConfigError("no adapters to serve")
        predictors = load_many(adapters)
    batcher = Batcher(predictors, limits.max_batch_texts, limits.max_wait_ms)
    # Adapters on one shared model report the same base number: how many base models are in memory.
    bases: dict[int, int] = {}
    base_of = {n: bases.setdefault(id(p.model), len(bases)) for n, p in predictors.items()}
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(title="peftlab serve", version="1", lifespan=lifespan,
                  description="Text classification with many adapters on one base model.")
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)
    app.state.predictors, app.state.batcher, app.state.limits = predictors, batcher, limits

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": _one_line(exc)}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        detail = str(exc.detail)
        if exc.status_code == 400 and detail == "There was an error parsing the body":  # FastAPI's, for non-UTF-8
            detail = "malformed body: send UTF-8 JSON"
        return JSONResponse({"error": detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # a bug or a model failure: say so in one line
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, 500)

    @app.post("/v1/classify", response_model=ClassifyResponse,
              responses={400: {"description": "body is not UTF-8"}, 404: {"description": "unknown adapter"},
                         413: {"description": "body too large"},
                         422: {"description": "invalid request: `{\"error\": \"one line\"}`"}})
    async def classify(req: ClassifyRequest) -> dict:
        """Labels for up to `max_texts_per_request` texts with one adapter, best first."""
        name = req.adapter
        if name is None:
            if len(predictors) > 1:
                raise HTTPException(422, f"adapter: required when several are loaded ({', '.join(predictors)})")
            name = next(iter(predictors))
        if name not in predictors:  # a registry lookup only; the pattern already refused path-like names
            raise HTTPException(404, f"unknown adapter '{name}' (loaded: {', '.join(predictors)})")
        if len(req.texts) > limits.max_texts_per_request:
            raise HTTPException(422, f"texts: {len(req.texts)} texts, the limit is {limits.max_texts_per_request} per request")
        for i, text in enumerate(req.texts):
            if len(text) > limits.max_chars_per_text:
                raise HTTPException(422, f"texts.{i}: {len(text)} characters, the limit is {limits.max_chars_per_text}")
        num_labels = len(predictors[name].labels)
        if req.top_k > num_labels:
            raise HTTPException(422, f"top_k: {req.top_k} is more than adapter '{name}' has labels ({num_labels})")
        try:
            check_threshold(predictors[name], req.threshold)
        except RunError as e:
            raise HTTPException(422, str(e)) from None
        records = await batcher.classify(name, list(req.texts), req.top_k, req.threshold)
        return {"adapter": name, "results": [
            {**r, "top_k": [{"label": lab, "score": s} for lab, s in r["top_k"]]} for r in records]}

    @app.get("/v1/adapters")
    async def list_adapters() -> dict:
        """Loaded adapters: kind, labels, source folder, which base model they share, counters."""
        return {"adapters": [
            {"name": n, "kind": p.kind, "num_labels": len(p.labels), "labels": list(p.labels.names),
             "source": p.source, "base": base_of[n], **_confidence_info(p), **batcher.per_adapter[n]}
            for n, p in predictors.items()]}

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness, limits and batching counters (batches < requests: requests were combined)."""
        return {"status": "ok", "adapters": len(predictors), "base_models": len(bases),
                "uptime_s": round(time.time() - started, 1), **batcher.totals, "limits": asdict(limits)}

    default_openapi = app.openapi

    def openapi() -> dict:
        """FastAPI's schema plus what this server enforces beyond the request model — the limits, the
        adapter names — so that a client (or a schema-driven fuzzer) can tell valid requests from invalid."""
        if app.openapi_schema is None:
            request = default_openapi()["components"]["schemas"]["ClassifyRequest"]
            props = request["properties"]
            props["texts"]["maxItems"] = limits.max_texts_per_request
            props["texts"]["items"]["maxLength"] = limits.max_chars_per_text
            names = {"type": "string", "enum": list(predictors)}
            if len(predictors) > 1:
                props["adapter"] = {**names, "description": "adapter name from GET /v1/adapters"}
                request["required"] = sorted({*request.get("required", []), "adapter"})
            else:
                props["adapter"]["anyOf"] = [names, {"type": "null"}]
            props["top_k"]["maximum"] = min(len(p.labels) for p in predictors.values())
            methods = {p.confidence.method if p.confidence else "none" for p in predictors.values()}
            if methods == {"none"}:  # no adapter rejects anything: a threshold is refused
                props["threshold"] = {"type": "null", "description": "no loaded adapter has an out-of-scope scorer"}
            elif len(methods) == 1:
                low, high = SCORE_RANGES[methods.pop()]
                number = {"type": "number", **({"minimum": low} if np.isfinite(low) else {}),
                          **({"maximum": high} if np.isfinite(high) else {})}
                props["threshold"]["anyOf"] = [number, {"type": "null"}]
        return app.openapi_schema

    app.openapi = openapi
    return app


def serve(config: str | Path, host: str = "127.0.0.1", port: int = 8000, limits: dict | None = None,
          num_threads: int | None = None, log_level: str = "info") -> None:
    """Load the adapters of ``config`` (YAML, run folder or folder of runs) and serve them with uvicorn."""
    try:
        import uvicorn
    except ImportError:
        raise PeftlabError("peftlab serve needs fastapi and uvicorn: pip install 'peftlab[serve]'") from None
    adapters, file_limits = read_config(config)
    if num_threads:  # torch keeps one global intra-op setting, which the model thread picks up
        torch.set_num_threads(num_threads)
    chosen = make_limits({**file_limits, **(limits or {})})  # command-line flags win over the file
    log.info("serve: loading %d adapter(s): %s", len(adapters), ", ".join(adapters))
    app = create_app(adapters, chosen)
    log.info("serve: http://%s:%d  (docs: /docs)", host, port)
    # One process, one event loop: the model thread and the batcher live in it (no --workers).
    uvicorn.run(app, host=host, port=port, log_level=log_level)
