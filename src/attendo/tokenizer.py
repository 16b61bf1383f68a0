"""The model's own tokenizer (the `tokenizers` library) and its chat template (jinja2).

Text inside a message is always text. A chat template renders one string, and encoding that
whole string would turn special-token text a user typed (say "<|im_end|>") into the control token
itself, letting a message close its own turn and forge another. So `encode_chat` encodes the
template's own text with special tokens recognised and every string the caller passed in (message
contents, tool arguments and results, tool descriptions) with them treated as plain text. Every
chat entry point (Model.chat, the CLI, prompt templates, the server) encodes through it.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from datetime import datetime
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from attendo.errors import InvalidSettingError


def _raise_template_error(message: str) -> None:
    raise InvalidSettingError(f"chat template: {message}")


def template_environment() -> jinja2.Environment:
    """The sandboxed jinja2 environment for every template attendo renders (chat templates here,
    prompt templates in attendo.prompting): a template can read its variables, never Python."""
    # The same environment Hugging Face renders chat templates in, so the text matches
    # apply_chat_template: block trimming, loop controls, a non-escaping tojson, raise_exception.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None, ensure_ascii=False, sort_keys=False: json.dumps(
        value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _compile_template(source: str) -> jinja2.Template:
    return template_environment().from_string(source)


class TextTokenizer:
    """word → token id and back, with the special tokens and chat template of one model."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        # Some tokenizer.json files pad or truncate every text to a fixed length (MiniLM: 128);
        # attendo pads batches and checks lengths itself, so the backend does neither.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.backend = tokenizer
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = _compile_template(chat_template) if chat_template else None
        self.special_texts = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
        # A copy that never matches special tokens in its input: user text through it stays text.
        self._plain = Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self._prefix, self._suffix = self._added_around()

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_plain(self, text: str) -> list[int]:
        """Ids of text with any special-token text in it encoded as ordinary text, and nothing added."""
        return self._plain.encode(text, add_special_tokens=False).ids if text else []

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The token's own text: what one id stands for, before merging with its neighbours."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        if self._template is None:
            raise InvalidSettingError("this model has no chat template; use generate() with a plain prompt")
        if not messages:
            raise InvalidSettingError("messages is empty")
        for message in messages:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise InvalidSettingError("each message needs a 'role' and a 'content'")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **variables,
        )

    @property
    def supports_tools(self) -> bool:
        """Whether the chat template reads a `tools` variable (the transformers convention)."""
        if self.chat_template is None:
            return False
        return "tools" in jinja2.meta.find_undeclared_variables(template_environment().parse(self.chat_template))

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any
    ) -> list[int]:
        """The chat prompt's token ids, every string the caller passed in encoded as plain text.

        When no such string contains special-token text (the usual case) this is the rendered
        prompt encoded whole, exactly as apply_chat_template's text. Otherwise each such string is
        rendered as a placeholder and encoded on its own (see `_PlaceholderRender`).
        """
        return self.encode_rendered(
            lambda data: self.apply_chat_template(data[0], add_generation_prompt, **data[1]), (messages, variables)
        )

    def encode_rendered(self, render: Callable[[Any], str], data: Any) -> list[int]:
        """The ids of render(data), every string inside data (nested in dicts, lists and tuples)
        encoded as plain text and the rest with special tokens recognised: what encode_chat does
        for a chat template, for any template (attendo.prompting's prompt templates)."""
        if not _has_special_leaf(data, self.special_texts):
            return self.encode(render(data))
        placeholders = _PlaceholderRender(self.special_texts)
        rendered = render(placeholders.mark(data))
        ids = list(self._prefix)
        for is_value, piece in placeholders.split(rendered):
            ids += self.encode_plain(piece) if is_value else self.encode(piece, add_special_tokens=False) if piece else []
        return ids + self._suffix

    def _added_around(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer's post-processor adds before and after a text (e.g. BOS)."""
        bare = self.encode("a", add_special_tokens=False)
        full = self.encode("a", add_special_tokens=True)
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return full[:start], full[start + len(bare) :]
        return [], []


def _has_special_leaf(value: Any, special_texts: list[str]) -> bool:
    if isinstance(value, str):
        return any(s in value for s in special_texts)
    if isinstance(value, dict):
        return any(_has_special_leaf(v, special_texts) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_special_leaf(v, special_texts) for v in value)
    return False


# A probe around each placeholder shows what the template did to the string it stood for: the
# ideographic spaces go when it was trimmed, the quote and newline come out escaped when it went
# through tojson. The private-use characters and hex digits pass every filter unchanged.
_EDGE = "\u3000"
_PROBE = '"\n'


class _PlaceholderRender:
    """Stand-ins for the strings that hold special-token text, and the way back from a render."""

    def __init__(self, special_texts: list[str]) -> None:
        self.special_texts = special_texts
        self.nonce = secrets.token_hex(8)
        self.values: list[str] = []
        self.pattern = re.compile(f"({_EDGE}?)\ue000{self.nonce}:(\\d+)\ue002(.*?)\ue001({_EDGE}?)", re.DOTALL)

    def mark(self, value: Any) -> Any:
        """value with each string that holds special-token text replaced by a placeholder."""
        if isinstance(value, str):
            if not any(s in value for s in self.special_texts):
                return value
            self.values.append(value)
            return f"{_EDGE}\ue000{self.nonce}:{len(self.values) - 1}\ue002{_PROBE}\ue001{_EDGE}"
        if isinstance(value, dict):
            return {k: self.mark(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.mark(v) for v in value)
        return value

    def split(self, rendered: str) -> list[tuple[bool, str]]:
        """The render as (is a caller's string, text) pieces, each string as the template showed it."""
        pieces: list[tuple[bool, str]] = []
        end = 0
        for match in self.pattern.finditer(rendered):
            pieces.append((False, rendered[end : match.start()]))
            leading, index, probe, trailing = match.groups()
            value = self.values[int(index)]
            value = value if leading else value.lstrip()
            value = value if trailing else value.rstrip()
            if probe == json.dumps(_PROBE)[1:-1]:
                value = json.dumps(value, ensure_ascii=False)[1:-1]
            elif probe != _PROBE:
                raise InvalidSettingError(
                    "the chat template changes message text in a way attendo cannot keep apart from its own "
                    "markup; remove the special-token text from the messages"
                )
            pieces.append((True, value))
            end = match.end()
        pieces.append((False, rendered[end:]))
        if any(f"\ue000{self.nonce}" in text for is_value, text in pieces if not is_value):
            raise InvalidSettingError("the chat template cut up message text; remove the special-token text from the messages")
        return pieces
