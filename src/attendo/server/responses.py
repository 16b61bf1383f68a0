"""Response objects in the OpenAI schema: completions, chat completions, their stream chunks,
logprobs in both formats, usage, and server-sent events."""

from __future__ import annotations

import json
from typing import Any

from attendo.generation.loop import TokenLogprob
from attendo.inspect.tokens import readable_tokens, token_labels
from attendo.tokenizer import TextTokenizer

LOGPROB_FLOOR = -9999.0  # JSON has no -Infinity: a token with zero probability reports this
# Made once: json.dumps with options builds a new encoder at every call, and a stream encodes a
# chunk per token.
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: `data: {json}` and a blank line."""
    text = data if isinstance(data, str) else _JSON.encode(data)
    return f"data: {text}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """cached_tokens: prompt tokens whose keys and values were reused rather than computed."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _lp(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


# --- token ids (attendo's return_token_ids) -----------------------------------------------------


def token_fields(tokenizer: TextTokenizer, ids: list[int]) -> dict[str, Any]:
    """The generated tokens of a choice: ids and readable strings (byte pieces as <0xF0>)."""
    return {"token_ids": ids, "tokens": readable_tokens(tokenizer, ids)}


def prompt_ids_field(prompts: list[list[int]]) -> dict[str, Any]:
    """The prompt's ids; a completions request with several prompts gets one list per prompt."""
    return {"prompt_token_ids": prompts[0] if len(prompts) == 1 else prompts}


class TokenIdFields:
    """return_token_ids. In a stream, each generated id goes out with the next chunk of its choice
    (a token whose text is held back rides with the text that follows it, or with the finish
    chunk), and the first chunk carries the prompt's ids. Off, it adds nothing."""

    def __init__(self, tokenizer: TextTokenizer, prompts: list[list[int]], enabled: bool) -> None:
        self.tokenizer = tokenizer
        self.enabled = enabled
        self.pending: dict[int, list[int]] = {}
        self.prompt: dict[str, Any] | None = prompt_ids_field(prompts) if enabled else None

    def add(self, index: int, token_id: int) -> None:
        if self.enabled and token_id >= 0:  # -1: no token (a generation ended by the server)
            self.pending.setdefault(index, []).append(token_id)

    def of(self, ids: list[int]) -> dict[str, Any]:
        """A choice's token fields (nothing when they were not asked for)."""
        return token_fields(self.tokenizer, ids) if self.enabled else {}

    def choice(self, index: int) -> dict[str, Any]:
        """The fields of the next chunk of choice `index`: its tokens since its last chunk."""
        return self.of(self.pending.pop(index, []))

    def prompt_once(self) -> dict[str, Any]:
        first, self.prompt = self.prompt, None
        return first or {}


# --- completions ------------------------------------------------------------------------------


def completion_logprobs(entries: list[TokenLogprob], text_offset: int) -> dict[str, Any]:
    """The legacy format: parallel lists, top alternatives as {token: logprob}."""
    offsets = []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [_lp(e.logprob) for e in entries],
        "top_logprobs": [{token: _lp(lp) for _, token, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(id: str, created: int, model: str, choices: list[dict]) -> dict[str, Any]:
    """A completion, or one chunk of a streamed one (the same object)."""
    return {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices}


# --- chat -------------------------------------------------------------------------------------


def chat_logprobs(entries: list[TokenLogprob], tokenizer: TextTokenizer) -> dict[str, Any]:
    """Each token's text, logprob and bytes: the token's own bytes, so that the pieces of a
    character split over tokens join back into it (their text alone is "\ufffd")."""
    byte_of = token_labels(tokenizer).bytes

    def entry(token_id: int, token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": _lp(logprob), "bytes": list(byte_of(token_id))}

    content = [
        entry(e.token_id, e.token, e.logprob) | {"top_logprobs": [entry(*alternative) for alternative in e.top]}
        for e in entries
    ]
    return {"content": content, "refusal": None}


def chat_choice(index: int, text: str | dict[str, Any], logprobs: dict | None, finish_reason: str | None) -> dict[str, Any]:
    """text: the reply's content, or its message fields (content and tool_calls)."""
    message = {"role": "assistant", "refusal": None} | ({"content": text} if isinstance(text, str) else text)
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_completion(id: str, created: int, model: str, choices: list[dict]) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion", "created": created, "model": model, "choices": choices}


def chat_chunk_choice(index: int, delta: dict, logprobs: dict | None, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk(id: str, created: int, model: str, choices: list[dict]) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
