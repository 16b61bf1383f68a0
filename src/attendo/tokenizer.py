"""The model's own tokenizer (the `tokenizers` library) and its chat template (jinja2)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
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

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

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
