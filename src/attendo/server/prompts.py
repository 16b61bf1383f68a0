"""Prompt text to token ids for the server.

A completion prompt is the client's own text, control tokens included, so it is encoded as is. A
chat prompt goes through `TextTokenizer.encode_chat`, the one path every chat entry point shares,
which keeps special-token text inside messages as text.
"""

from __future__ import annotations

from typing import Any

from attendo.tokenizer import TextTokenizer


class PromptEncoder:
    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer

    def text(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def chat(self, messages: list[dict[str, Any]], **variables: Any) -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True, **variables)
