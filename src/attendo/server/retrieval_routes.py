"""Retrieval over the server's indexes (`attendo serve --index NAME=FILE`):

- `POST /v1/retrieve` {"index", "query", "top_k", "mode"} → the passages, as `attendo ask --json`
  gives them: {"object": "retrieval", "index", "query", "passages": [{"source", "text", "score",
  "vector_score", "keyword_score"}, ...]}.
- `POST /v1/indexes/{name}/chat/completions`: retrieval-augmented chat. The body is an ordinary
  chat completion request; the last user message is taken as the question, its passages are
  retrieved and the message is replaced by the question with its numbered passages (the answer
  template of attendo.retrieval.answer), and the request goes on to /v1/chat/completions. So an
  OpenAI client whose base_url is `.../v1/indexes/NAME` chats over that index unchanged. An
  optional "retrieval": {"top_k", "mode"} field tunes the search; a response that is not streamed
  also carries the "passages" it used.

Indexes open on first use (with the encoder each was built with) and are searched one request at
a time each (one SQLite connection per index).
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from attendo.errors import AttendoError
from attendo.server.errors import APIError, bad_request
from attendo.server.schemas import parse

MAX_TOP_K = 50


class RetrievalOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    top_k: int = Field(4, ge=1, le=MAX_TOP_K)
    mode: Literal["hybrid", "vector", "keyword"] = "hybrid"


class RetrieveBody(RetrievalOptions):
    index: str = Field(min_length=1)
    query: str = Field(min_length=1)


class AugmentedChatBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    messages: list[dict[str, Any]] = Field(min_length=1)
    retrieval: RetrievalOptions = Field(default_factory=RetrievalOptions)


class ServedIndexes:
    """The server's indexes by name, each opened once, on first use."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = paths
        self._opened: dict[str, Any] = {}
        self._locks = {name: threading.Lock() for name in paths}

    def search(self, name: str, query: str, top_k: int, mode: str) -> list[Any]:
        from attendo.retrieval.index import Index

        if name not in self.paths:
            known = ", ".join(sorted(self.paths)) or "none (start the server with --index NAME=FILE)"
            raise APIError(404, f"The index `{name}` does not exist; indexes: {known}.", param="index", code="index_not_found")
        with self._locks[name]:
            if name not in self._opened:
                self._opened[name] = Index.open(self.paths[name])
            return self._opened[name].search(query, top_k, mode)


def _indexes(request: Request) -> ServedIndexes:
    state = request.app.state
    if not hasattr(state, "indexes"):
        state.indexes = ServedIndexes(dict(state.models.settings.indexes))
    return state.indexes


async def _search(request: Request, name: str, query: str, options: RetrievalOptions) -> list[Any]:
    try:
        return await asyncio.to_thread(_indexes(request).search, name, query, options.top_k, options.mode)
    except AttendoError as e:
        raise bad_request(str(e), param="index") from None


router = APIRouter()


@router.post("/v1/retrieve")
async def retrieve(request: Request) -> dict[str, Any]:
    from attendo.server.app import read_json

    body = parse(RetrieveBody, await read_json(request, request.app.state.models.settings.max_body_bytes))
    passages = await _search(request, body.index, body.query, body)
    return {"object": "retrieval", "index": body.index, "query": body.query, "passages": [p.as_dict() for p in passages]}


@router.post("/v1/indexes/{name}/chat/completions")
async def augmented_chat(name: str, request: Request) -> Response:
    from attendo.retrieval.answer import augmented_question
    from attendo.server.app import chat_completions, read_json

    data = await read_json(request, request.app.state.models.settings.max_body_bytes)
    body = parse(AugmentedChatBody, data)
    last = next((i for i in range(len(body.messages) - 1, -1, -1) if body.messages[i].get("role") == "user"), None)
    if last is None or not isinstance(body.messages[last].get("content"), str) or not body.messages[last]["content"].strip():
        raise bad_request("retrieval-augmented chat needs a last user message with text content: the question", param="messages")
    question = body.messages[last]["content"]
    passages = await _search(request, name, question, body.retrieval)
    messages = [dict(m) for m in body.messages]
    messages[last]["content"] = augmented_question(question, passages)
    forwarded = json.dumps({k: v for k, v in data.items() if k != "retrieval"} | {"messages": messages}).encode()
    response = await chat_completions(Request(request.scope, _replay(forwarded, request)))
    if not isinstance(response, JSONResponse) or response.status_code != 200:
        return response
    answer = json.loads(response.body) | {"passages": [p.as_dict() for p in passages]}
    return JSONResponse(answer)


def _replay(body: bytes, request: Request) -> Any:
    """An ASGI receive that delivers `body` once, then listens to the real client (so that a
    disconnect still cancels the generation)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await request.receive()

    return receive
