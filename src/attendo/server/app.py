"""The OpenAI-compatible HTTP API: routes, the app factory, and running it under uvicorn.

A route reads and validates its body (every client mistake is a 4xx here, before any stream
byte), encodes the prompt, turns the body into generation `Request`s and hands them to the
model's scheduler; then it either collects the deltas into one response or streams them as
server-sent events. The routes never touch the network: generation goes through the scheduler's
`Batch`, text through the model's tokenizer.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from attendo.errors import AttendoError, ContextLengthError, UnsupportedModelError
from attendo.generation.loop import Request as GenerationRequest
from attendo.generation.loop import TokenLogprob, check_request
from attendo.inspect.tokens import readable_tokens
from attendo.model import Model
from attendo.prompting.grammar import Grammar
from attendo.server import responses as openai
from attendo.server import retrieval_routes
from attendo.server.errors import APIError, bad_request, queue_full, unavailable
from attendo.server.scheduler import Delta, QueueFull, Scheduler, ShuttingDown, Ticket
from attendo.server.schemas import (
    ChatBody,
    CompletionBody,
    DetokenizeBody,
    EmbeddingBody,
    GenerationBody,
    TokenizeBody,
    parse,
)
from attendo.server.served import Served, ServedModels, ServerSettings
from attendo.server.structured import conversation, plan_chat

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the window
JSON_TYPES = ("application/json",)
PLAYGROUND = Path(__file__).parent / "static"  # the web playground: plain HTML, CSS and JavaScript modules


# --- reading requests -------------------------------------------------------------------------


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 415 for another content type, 413 past `limit` bytes, 400 if malformed."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in JSON_TYPES:
        raise APIError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"The request body is over the limit of {limit} bytes.", code="body_too_large")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"The request body is over the limit of {limit} bytes.", code="body_too_large")
    except ClientDisconnect:
        raise bad_request("the client disconnected while sending the body") from None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"The body is not valid JSON: {e}", code="invalid_json") from None


def _models(request: Request) -> ServedModels:
    return request.app.state.models


async def check_api_key(request: Request) -> None:
    key = _models(request).settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "Incorrect or missing API key: send Authorization: Bearer KEY.", code="invalid_api_key")


def generation_requests(
    served: Served, body: GenerationBody, prompts: list[list[int]], logprobs: int | None, default_max: int | None, param: str,
    grammar: Grammar | None = None,
) -> list[GenerationRequest]:
    """n requests per prompt (choice index = prompt * n + choice), each with its own seed."""
    model = served.model
    overrides = body.sampling_overrides()
    if "temperature" not in overrides and "do_sample" not in model.generation_defaults:
        overrides["do_sample"] = True  # OpenAI's default temperature is 1: sample
    try:
        base = model.sampling_settings(**overrides)
        settings = [replace(base, seed=seed) for seed in body.seeds()]
    except AttendoError as e:
        raise bad_request(str(e)) from None
    vocab = model.config.vocab_size
    requests = []
    for ids in prompts:
        if not ids:
            raise bad_request("The prompt is empty.", param=param)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"Token id {bad} is outside the vocabulary (0..{vocab - 1}).", param=param)
        room = served.window - len(ids)
        max_tokens = body.max_tokens if body.max_tokens is not None else min(default_max or room, room)
        if room < 1 or max_tokens > room:
            raise APIError(
                400,
                f"This model's maximum context length is {served.window} tokens. However, you requested "
                f"{len(ids) + max(max_tokens, 1)} tokens ({len(ids)} in the prompt, {max(max_tokens, 1)} for the "
                "completion). Please reduce the length of the prompt or max_tokens.",
                param=param if room < 1 else "max_tokens",
                code="context_length_exceeded",
            )
        for sampling in settings:
            request = GenerationRequest(ids, sampling, max_tokens, tuple(body.stop or ()), logprobs, grammar)
            try:  # the generation loop's own checks, as the last word
                check_request(request, served.window, vocab)
            except ContextLengthError as e:
                raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
            except AttendoError as e:
                raise bad_request(str(e)) from None
            requests.append(request)
    return requests


# --- generations in flight --------------------------------------------------------------------


class ClientGone(Exception):
    """The client disconnected: nobody is waiting for the rest."""


@dataclass
class Choice:
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


class Flight:
    """One HTTP request's ticket at the scheduler, cancelled as soon as its client goes away
    (still queued, or mid-stream): a watcher waits for http.disconnect the whole time."""

    def __init__(self, request: Request, scheduler: Scheduler, ticket: Ticket) -> None:
        self.request = request
        self.scheduler = scheduler
        self.ticket = ticket
        self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass
        self.scheduler.cancel(self.ticket)
        self.ticket.queue.put_nowait(ClientGone())

    def deltas(self) -> AsyncIterator[Delta]:
        return self.ticket.deltas()

    def cached_tokens(self, n: int) -> int:
        """Prompt tokens the scheduler reused from its cache (each prompt once, not once per choice);
        read once the ticket's sequences have all started."""
        return sum(sequence.reused for sequence in self.ticket.sequences[::n])

    def caught_up(self) -> bool:
        """Whether every delta that has arrived was read: a stream sends what they made then, in
        one write (deltas that pile up while the event loop is busy go out together)."""
        return self.ticket.queue.empty()

    async def collect(self) -> list[Choice]:
        choices = [Choice() for _ in self.ticket.requests]
        async for delta in self.deltas():
            choice = choices[delta.index]
            choice.text.append(delta.text)
            choice.tokens += delta.token_id >= 0
            if delta.token_id >= 0:
                choice.token_ids.append(delta.token_id)
            if delta.logprob is not None:
                choice.logprobs.append(delta.logprob)
            if delta.finish_reason is not None:
                choice.finish_reason = delta.finish_reason
        return choices

    def close(self) -> None:
        self._watcher.cancel()
        self.scheduler.cancel(self.ticket)  # a no-op when every choice has finished


def start(request: Request, served: Served, requests: list[GenerationRequest]) -> Flight:
    scheduler = served.scheduler
    assert scheduler is not None
    if len(requests) > scheduler.max_batch + scheduler.max_queue:
        raise bad_request(
            f"This request needs {len(requests)} sequences (prompts × n); this server holds at most "
            f"{scheduler.max_batch + scheduler.max_queue} at a time.", param="n"
        )
    try:
        ticket = scheduler.submit(requests, asyncio.get_running_loop())
    except QueueFull:
        raise queue_full(retry_after=1) from None
    except ShuttingDown:
        raise unavailable("the server is shutting down") from None
    prompts = {id(r.prompt_ids): len(r.prompt_ids) for r in requests}
    _models(request).metrics.prompt(served.name, sum(prompts.values()))
    return Flight(request, scheduler, ticket)


def _failure(error: BaseException) -> str:
    return openai.sse(APIError(500, f"generation failed: {error}", type="server_error").body())


def _take(events: list[str]) -> str:
    """The events made so far, as one write (each write is a system call and wakes the client)."""
    text = "".join(events)
    events.clear()
    return text


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _prompt_tokens(requests: list[GenerationRequest], n: int) -> int:
    return sum(len(r.prompt_ids) for r in requests[::n])  # each prompt counts once, not once per choice


# --- routes -----------------------------------------------------------------------------------

router = APIRouter(dependencies=[Depends(check_api_key)])


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    created = _models(request).created
    return {"object": "list", "data": [_model_card(name, created) for name in _models(request).names]}


@router.get("/v1/models/{name:path}")
async def retrieve_model(name: str, request: Request) -> dict[str, Any]:
    models = _models(request)
    if name not in models.names:
        raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
    return _model_card(name, models.created)


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "attendo"}


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    models = _models(request)
    body = parse(CompletionBody, await read_json(request, models.settings.max_body_bytes))
    served = models.generator(body.model)
    prompts = []
    for prompt in body.prompts():
        if isinstance(prompt, str) and not prompt:
            raise bad_request("The prompt is empty.", param="prompt")
        prompts.append(served.prompts.text(prompt) if isinstance(prompt, str) else list(prompt))
    requests = generation_requests(served, body, prompts, body.logprobs, COMPLETION_DEFAULT_MAX_TOKENS, "prompt")
    echoes = [""] * len(requests)
    if body.echo:
        texts = [p if isinstance(p, str) else served.model.tokenizer.decode(p) for p in body.prompts()]
        echoes = [texts[i // body.n] for i in range(len(requests))]
    flight = start(request, served, requests)
    id, created, prompt_tokens = f"cmpl-{uuid.uuid4().hex}", int(time.time()), _prompt_tokens(requests, body.n)

    def logprobs(entries: list[TokenLogprob], offset: int) -> dict | None:
        return openai.completion_logprobs(entries, offset) if body.logprobs is not None else None

    token_ids = openai.TokenIdFields(served.model.tokenizer, prompts, body.return_token_ids)

    if not body.stream:
        try:
            choices = await flight.collect()
        except ClientGone:
            return Response(status_code=499)
        finally:
            flight.close()
        result = [
            openai.completion_choice(i, echoes[i] + "".join(c.text), logprobs(c.logprobs, len(echoes[i])), c.finish_reason)
            | token_ids.of(c.token_ids)
            for i, c in enumerate(choices)
        ]
        usage = openai.usage(prompt_tokens, sum(c.tokens for c in choices), flight.cached_tokens(body.n))
        return JSONResponse(openai.completion(id, created, body.model, result) | {"usage": usage} | token_ids.prompt_once())

    usage_field = {"usage": None} if body.include_usage else {}

    def chunk(index: int, text: str, lp: dict | None, finish_reason: str | None) -> str:
        choice = openai.completion_choice(index, text, lp, finish_reason) | token_ids.choice(index)
        return openai.sse(openai.completion(id, created, body.model, [choice]) | usage_field | token_ids.prompt_once())

    async def events() -> AsyncIterator[str]:
        generated = finished = 0
        pending: dict[int, list[TokenLogprob]] = defaultdict(list)
        offsets = [len(e) for e in echoes]
        out: list[str] = []  # events made, not sent yet
        try:
            out += [chunk(index, echo, None, None) for index, echo in enumerate(echoes) if echo]
            if out:
                yield _take(out)
            async for delta in flight.deltas():
                generated += delta.token_id >= 0
                finished += delta.finish_reason is not None
                token_ids.add(delta.index, delta.token_id)
                if delta.logprob is not None:
                    pending[delta.index].append(delta.logprob)
                if delta.text or delta.finish_reason:
                    entries = pending.pop(delta.index, [])
                    out.append(chunk(delta.index, delta.text, logprobs(entries, offsets[delta.index]), delta.finish_reason))
                    offsets[delta.index] += sum(len(e.token) for e in entries)
                if out and finished < len(requests) and flight.caught_up():  # the last one goes with the end
                    yield _take(out)
            if body.include_usage:
                usage = openai.usage(prompt_tokens, generated, flight.cached_tokens(body.n))
                out.append(openai.sse(openai.completion(id, created, body.model, []) | {"usage": usage}))
            out.append(openai.sse("[DONE]"))
            yield _take(out)
        except ClientGone:
            return
        except Exception as e:  # a server fault after the stream began: say so in the stream
            yield _take(out) + _failure(e)
        finally:
            flight.close()

    return event_stream(events())


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    models = _models(request)
    body = parse(ChatBody, await read_json(request, models.settings.max_body_bytes))
    served = models.generator(body.model)
    plan = plan_chat(served, body)  # the prompt, and the grammar of a structured reply or tool calls
    requests = generation_requests(served, body, [plan.prompt], body.logprobs_count, None, "messages", plan.grammar)
    flight = start(request, served, requests)
    id, created, prompt_tokens = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), len(plan.prompt)

    def logprobs(entries: list[TokenLogprob]) -> dict | None:
        return openai.chat_logprobs(entries, served.model.tokenizer) if body.logprobs else None

    token_ids = openai.TokenIdFields(served.model.tokenizer, [plan.prompt], body.return_token_ids)

    if not body.stream:
        try:
            choices = await flight.collect()
        except ClientGone:
            return Response(status_code=499)
        finally:
            flight.close()
        replies = [plan.message("".join(c.text), c.finish_reason or "stop") for c in choices]
        result = [
            openai.chat_choice(i, m, logprobs(c.logprobs), f) | token_ids.of(c.token_ids)
            for i, (c, (m, f)) in enumerate(zip(choices, replies))
        ]
        usage = openai.usage(prompt_tokens, sum(c.tokens for c in choices), flight.cached_tokens(body.n))
        return JSONResponse(openai.chat_completion(id, created, body.model, result) | {"usage": usage} | token_ids.prompt_once())

    usage_field = {"usage": None} if body.include_usage else {}

    def chunk(index: int, delta: dict, lp: dict | None, finish_reason: str | None) -> str:
        choice = openai.chat_chunk_choice(index, delta, lp, finish_reason) | token_ids.choice(index)
        return openai.sse(openai.chat_chunk(id, created, body.model, [choice]) | usage_field | token_ids.prompt_once())

    async def events() -> AsyncIterator[str]:
        generated = finished = 0
        pending: dict[int, list[TokenLogprob]] = defaultdict(list)
        out: list[str] = []  # events made, not sent yet
        try:
            # the role comes first, in a chunk of its own
            yield "".join(chunk(index, {"role": "assistant", "content": ""}, None, None) for index in range(len(requests)))
            async for delta in flight.deltas():
                generated += delta.token_id >= 0
                token_ids.add(delta.index, delta.token_id)
                if delta.logprob is not None:
                    pending[delta.index].append(delta.logprob)
                for piece in plan.deltas(delta.index, delta.text):
                    out.append(chunk(delta.index, piece, logprobs(pending.pop(delta.index, [])), None))
                if delta.finish_reason:
                    finished += 1
                    last, finish_reason = plan.finish(delta.index, delta.finish_reason)
                    for piece in last:
                        out.append(chunk(delta.index, piece, logprobs(pending.pop(delta.index, [])), None))
                    out.append(chunk(delta.index, {}, logprobs(pending.pop(delta.index, [])), finish_reason))
                if out and finished < len(requests) and flight.caught_up():  # the last one goes with the end
                    yield _take(out)
            if body.include_usage:
                usage = openai.usage(prompt_tokens, generated, flight.cached_tokens(body.n))
                out.append(openai.sse(openai.chat_chunk(id, created, body.model, []) | {"usage": usage}))
            out.append(openai.sse("[DONE]"))
            yield _take(out)
        except ClientGone:
            return
        except Exception as e:  # a server fault after the stream began: say so in the stream
            yield _take(out) + _failure(e)
        finally:
            flight.close()

    return event_stream(events())


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    models = _models(request)
    body = parse(EmbeddingBody, await read_json(request, models.settings.max_body_bytes))
    served = models.get(body.model)
    texts: list[str] = body.input  # type: ignore[assignment]  # the validator made it a list of strings
    try:
        vectors = await asyncio.to_thread(served.model.embed, texts)
    except UnsupportedModelError:
        raise bad_request(f"The model `{body.model}` does not support embeddings.", param="model") from None
    except ContextLengthError as e:
        raise APIError(400, str(e), param="input", code="context_length_exceeded") from None
    except AttendoError as e:
        raise bad_request(str(e), param="input") from None
    tokens = sum(len(ids) for ids in served.model.tokenizer.encode_batch(texts))
    rows = vectors.float().cpu().numpy()
    data = [
        {"object": "embedding", "index": i, "embedding": _embedding(row, body.encoding_format)}
        for i, row in enumerate(rows)
    ]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return JSONResponse({"object": "list", "data": data, "model": body.model, "usage": usage})


def _embedding(row: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":  # what the openai client asks for by default: little-endian float32
        return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
    return row.tolist()


@router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    models = _models(request)
    body = parse(TokenizeBody, await read_json(request, models.settings.max_body_bytes))
    served = models.get(body.model)
    tokenizer = served.model.tokenizer
    try:
        if body.messages is not None:
            messages, variables = conversation(served, body.messages, body.tools)
            ids = served.prompts.chat(messages, **variables)
        else:
            ids = tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
    except AttendoError as e:
        raise bad_request(str(e), param="messages") from None
    result: dict[str, Any] = {"count": len(ids), "max_model_len": served.window, "tokens": ids}
    if body.messages is not None:  # what the model reads, tools and all
        result["prompt"] = tokenizer.decode(ids, skip_special_tokens=False)
    if body.return_token_strs:
        result["token_strs"] = readable_tokens(tokenizer, ids)
    return result


@router.post("/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    models = _models(request)
    body = parse(DetokenizeBody, await read_json(request, models.settings.max_body_bytes))
    tokenizer = models.get(body.model).model.tokenizer
    bad = next((t for t in body.tokens if not 0 <= t < tokenizer.vocab_size), None)
    if bad is not None:
        raise bad_request(f"Token id {bad} is outside the vocabulary (0..{tokenizer.vocab_size - 1}).", param="tokens")
    return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    models = _models(request)
    text = models.metrics.render(models.queues())
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def health(request: Request) -> JSONResponse:
    """Public (no API key): 200 once every model is loaded, 503 while loading or shutting down."""
    models = _models(request)
    if models.load_error is not None:
        return JSONResponse({"status": "error", "message": models.load_error}, status_code=503)
    if not models.ready.is_set():
        return JSONResponse({"status": "loading"}, status_code=503)
    if models.shutting_down:
        return JSONResponse({"status": "shutting down"}, status_code=503)
    return JSONResponse({"status": "ok", "models": models.names})


# --- the app ----------------------------------------------------------------------------------

ROUTES = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize",
          "/health", "/metrics", "/v1/retrieve", "/v1/inspect/stages", "/v1/inspect/attention",
          "/v1/inspect/embeddings", "/v1/inspect/model"}  # fmt: skip


class CountRequests:
    """ASGI middleware: count every answered request by route and status, for /metrics."""

    def __init__(self, app: ASGIApp, models: ServedModels) -> None:
        self.app = app
        self.models = models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            path = scope["path"]
            route = path if path in ROUTES else "/v1/models/{name}" if path.startswith("/v1/models/") else "other"
            self.models.metrics.request(route, status)


def create_app(
    settings: ServerSettings,
    models: dict[str, Model] | None = None,
    loader: Callable[[str, str | None], Model] | None = None,
) -> FastAPI:
    """The ASGI app. `models` are served as already loaded (tests); the rest of settings.models are
    loaded in the background once the app starts, with `loader` (default attendo.load)."""
    served = ServedModels(settings, dict(models or {}), loader)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served.start()
        yield
        served.close()

    app = FastAPI(title="attendo", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.models = served
    app.include_router(router)
    app.include_router(retrieval_routes.router, dependencies=[Depends(check_api_key)])
    from attendo.server.inspect_routes import router as inspection  # it imports this module's helpers

    app.include_router(inspection)
    app.add_api_route("/health", health, methods=["GET"])
    # The playground page (public like /health: it asks for the API key itself).
    app.add_api_route("/", lambda: FileResponse(PLAYGROUND / "index.html"), methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=PLAYGROUND), name="static")

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, str(error.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(error).__name__}", type="server_error").response()

    app.add_middleware(CountRequests, models=served)
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, which also tells the schedulers to drain when SIGTERM/SIGINT arrives:
    no new requests, open generations get the grace period to finish, then end cleanly."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        # A signal handler must not wait for locks the interrupted code may hold: drain elsewhere.
        threading.Thread(target=self._on_exit, name="attendo-drain", daemon=True).start()
        super().handle_exit(sig, frame)


def serve(settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the server until SIGTERM or Ctrl-C."""
    # The scheduler thread needs the GIL between kernel calls while the event loop writes the
    # streams; Python's default 5 ms turn made it wait that long (0.5 ms: about 8% more tokens/s
    # at concurrency 16 in benchmarks/bench_server.py, with the C kernels running without the GIL).
    sys.setswitchinterval(0.0005)
    app = create_app(settings)
    # uvicorn's "auto" loop and HTTP parser are uvloop and httptools (dependencies): the event
    # loop's thread took 59 µs of CPU per streamed token at 16 streams, 73 with asyncio's loop and
    # h11 (time the model's threads lose a core for).
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(settings.shutdown_grace) + 5
    )
    _Server(config, app.state.models.begin_shutdown).run()
