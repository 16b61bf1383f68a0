"""Prompt text to token ids for the server, with user text always encoded as text.

A chat template renders one string; encoding it as a whole would turn special-token text that a
user typed (say "<|im_end|>") into the control token itself, letting a message close its own turn
and forge another. So when any message content contains special-token text, the prompt is
rendered with a placeholder for each content, and the pieces are encoded separately: the
template's text with special tokens recognized, each content with them treated as plain text.
Otherwise (the usual case) the rendered prompt is encoded whole, exactly as `Model.chat` does.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from tokenizers import Tokenizer

from attendo.tokenizer import TextTokenizer


class PromptEncoder:
    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        added = tokenizer.backend.get_added_tokens_decoder().values()
        self.special_texts = [t.content for t in added if t.special]
        # A copy of the tokenizer that never matches special tokens in its input.
        self._plain = Tokenizer.from_str(tokenizer.backend.to_str())
        self._plain.encode_special_tokens = True
        self._prefix, self._suffix = self._added_around()

    def text(self, prompt: str) -> list[int]:
        """A completion prompt: the client wrote it, control tokens included, so encode as is."""
        return self.tokenizer.encode(prompt)

    def chat(self, messages: list[dict[str, Any]]) -> list[int]:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if not any(s in m["content"] for m in messages for s in self.special_texts):
            return self.tokenizer.encode(prompt)
        nonce = secrets.token_hex(8)
        marked = [{**m, "content": f"\ue000{nonce}:{i}\ue001"} for i, m in enumerate(messages)]
        rendered = self.tokenizer.apply_chat_template(marked, add_generation_prompt=True)
        ids = list(self._prefix)
        pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", rendered)
        # re.split with one group alternates: template text, content index, template text, ...
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                ids += self.tokenizer.encode(piece, add_special_tokens=False) if piece else []
            else:
                content = messages[int(piece)]["content"]
                ids += self._plain.encode(content, add_special_tokens=False).ids if content else []
        return ids + self._suffix

    def _added_around(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer's post-processor adds before and after a text (e.g. BOS)."""
        bare = self.tokenizer.encode("a", add_special_tokens=False)
        full = self.tokenizer.encode("a", add_special_tokens=True)
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return full[:start], full[start + len(bare) :]
        return [], []
