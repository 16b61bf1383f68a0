"""The inspection API (attendo's own routes, used by the playground page): what the model does.

- POST /v1/inspect/stages: the sampler's stages at one step of a context (attendo.inspect.stages).
  The logits of recent contexts are kept per model (a small LRU), so the same context with other
  settings (a slider moved) runs only the sampler.
- POST /v1/inspect/attention: one layer's attention maps of a text (attendo.inspect.attention),
  at most MAX_ATTENTION_TOKENS tokens (413 beyond).
- POST /v1/inspect/embeddings: vectors of words or texts, their PCA and angles (inspect.geometry).
- GET /v1/inspect/model: `attendo info` and the data path with the model's numbers.

A forward pass for inspection never runs beside a generation step: on a generating model it runs
on the model's scheduler thread between two steps (Scheduler.call), so the batch pauses for one
bounded pass instead of sharing the CPU with it; on other models one inspection at a time runs in
a worker thread. Errors are the server's OpenAI-shaped 4xx.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from attendo.errors import AttendoError, ContextLengthError, UnsupportedModelError
from attendo.generation.sampler import SamplingSettings, make_generator
from attendo.inspect.attention import TooManyTokensError, attention_inputs, attention_json, layer_attention, resolve_layer
from attendo.inspect.datapath import data_path
from attendo.inspect.geometry import geometry
from attendo.inspect.stages import check_token_ids, penalty_context, stages_report
from attendo.inspect.summary import describe
from attendo.inspect.tokens import token_labels
from attendo.server.app import _models, check_api_key, read_json
from attendo.server.errors import APIError, bad_request, unavailable
from attendo.server.scheduler import ShuttingDown
from attendo.server.schemas import AttentionBody, GeometryBody, StagesBody, parse
from attendo.server.served import Served

LOGITS_PER_MODEL = 16  # contexts whose next-token logits are kept (vocab floats each)
SAMPLING_CONTROLS = ("temperature", "top_k", "top_p", "min_p")

T = TypeVar("T")
B = TypeVar("B", bound=BaseModel)
router = APIRouter(dependencies=[Depends(check_api_key)])


class Inspection:
    """What the routes keep between requests: recent logits per model, and a lock per model that
    has no scheduler. Touched only on the event loop's thread."""

    def __init__(self) -> None:
        self.logits: dict[str, OrderedDict[tuple[int, ...], torch.Tensor]] = {}
        self.locks: dict[str, threading.Lock] = {}

    def cached(self, model: str, ids: list[int]) -> torch.Tensor | None:
        recent = self.logits.setdefault(model, OrderedDict())
        key = tuple(ids)
        if key in recent:
            recent.move_to_end(key)
        return recent.get(key)

    def keep(self, model: str, ids: list[int], logits: torch.Tensor) -> None:
        recent = self.logits.setdefault(model, OrderedDict())
        recent[tuple(ids)] = logits
        while len(recent) > LOGITS_PER_MODEL:
            recent.popitem(last=False)


def _inspection(request: Request) -> Inspection:
    state = request.app.state
    if not hasattr(state, "inspection"):
        state.inspection = Inspection()
    return state.inspection


def client_error(error: AttendoError, param: str | None = None) -> APIError:
    if isinstance(error, TooManyTokensError):
        return APIError(413, str(error), param=param, code="too_many_tokens")
    if isinstance(error, ContextLengthError):
        return APIError(400, str(error), param=param, code="context_length_exceeded")
    if isinstance(error, UnsupportedModelError):
        return bad_request(str(error), param="model", code="unsupported_model")
    return bad_request(str(error), param=param)


async def on_model(request: Request, served: Served, job: Callable[[], T], param: str | None = None) -> T:
    """Run job (a forward pass) where it cannot disturb generation (see the module docstring)."""
    try:
        if served.scheduler is not None:
            try:
                future = served.scheduler.call(job)
            except ShuttingDown:
                raise unavailable("the server is shutting down") from None
            return await asyncio.wrap_future(future)
        lock = _inspection(request).locks.setdefault(served.name, threading.Lock())

        def locked() -> T:
            with lock:
                return job()

        return await asyncio.to_thread(locked)
    except AttendoError as e:
        raise client_error(e, param) from None


def json_response(build: Callable[[], dict[str, Any]]) -> Callable[[], Response]:
    """Build and serialise a large answer off the event loop (asyncio.to_thread(...) calls it)."""

    def run() -> Response:
        body = json.dumps(build(), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return Response(body.encode("utf-8"), media_type="application/json")

    return run


def stage_settings(given: dict[str, Any]) -> SamplingSettings:
    """Missing settings are off; naming a sampling control without do_sample means sampling, as
    for the generation routes."""
    if "do_sample" not in given and any(k in given for k in SAMPLING_CONTROLS):
        given = {**given, "do_sample": given.get("temperature", 1.0) != 0}
    try:
        return SamplingSettings(**given)
    except AttendoError as e:
        raise bad_request(str(e), param="settings") from None


async def read_body(request: Request, kind: type[B]) -> tuple[B, Served]:
    """The validated body and the model it names."""
    models = _models(request)
    body = parse(kind, await read_json(request, models.settings.max_body_bytes))
    return body, models.get(body.model)  # type: ignore[attr-defined]


@router.post("/v1/inspect/stages")
async def stages(request: Request) -> Response:
    body, served = await read_body(request, StagesBody)
    model = served.model
    settings = stage_settings(body.settings.given())
    try:
        check_token_ids(body.token_ids, model.config.vocab_size, served.window)
        history = penalty_context(model, body.token_ids)
    except AttendoError as e:
        raise client_error(e, "token_ids") from None
    inspection = _inspection(request)
    logits = inspection.cached(body.model, body.token_ids)
    reused = logits is not None
    if logits is None:
        logits = await on_model(request, served, lambda: model.next_token_logits(body.token_ids), "token_ids")
        inspection.keep(body.model, body.token_ids, logits)
    label = token_labels(model.tokenizer).label
    generator = None if settings.seed is None else make_generator(settings.seed)

    def build() -> dict[str, Any]:
        report = stages_report(logits, settings, label, previous_ids=history, top=body.top, chosen=body.chosen,
                               generator=generator)  # fmt: skip
        return {"model": body.model, "vocab_size": int(logits.shape[-1]), **report.to_dict(), "reused_logits": reused}

    try:
        return await asyncio.to_thread(json_response(build))
    except AttendoError as e:
        raise client_error(e, "chosen") from None


@router.post("/v1/inspect/attention")
async def attention(request: Request) -> Response:
    body, served = await read_body(request, AttentionBody)
    model = served.model
    try:
        ids, target = await asyncio.to_thread(attention_inputs, model, body.text, body.token_ids, body.target)
    except AttendoError as e:
        raise client_error(e, "token_ids" if body.token_ids is not None else "text") from None
    try:
        layer = resolve_layer(model, body.layer)
    except AttendoError as e:
        raise client_error(e, "layer") from None
    view = await on_model(request, served, lambda: layer_attention(model, ids, target, layer))
    return await asyncio.to_thread(json_response(lambda: {"model": body.model, **attention_json(model, view)}))


@router.post("/v1/inspect/embeddings")
async def embeddings(request: Request) -> Response:
    body, served = await read_body(request, GeometryBody)
    found = await on_model(request, served, lambda: geometry(served.model, body.inputs, body.dims), "inputs")
    return JSONResponse({"model": body.model, **found.to_dict()})


@router.get("/v1/inspect/model")
async def model_view(request: Request, model: str | None = None) -> dict[str, Any]:
    if not model:
        raise bad_request("Missing required parameter: 'model'.", param="model")
    served = _models(request).get(model)
    return {"model": model, "info": describe(served.model), "path": data_path(served.model)}
