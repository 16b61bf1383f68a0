"""Each token as a person should read it: its own text, leading space kept, and the pieces of a
character split over several tokens shown as their bytes (`<0xF0>`), never as U+FFFD.

Decoding one token alone cannot show this: a token holding the first bytes of an emoji decodes to
"�", and a SentencePiece decoder strips the leading space of a text's first word. So the label is
read from the vocabulary entry itself, the way the tokenizer's decoder spells it:

- byte-level BPE (GPT-2, SmolLM2, Qwen2): each character of the entry stands for one byte
  (GPT-2's printable alphabet, "Ġ" is the space); the bytes are decoded as UTF-8, and bytes that
  do not form a whole character are shown as `<0xXX>`.
- SentencePiece-style (LLaMA, T5): "▁" is the space; byte-fallback entries are already `<0xXX>`.
- WordPiece (BERT): the entry as it is ("##ing" continues a word).
- added and special tokens (`<|im_end|>`, `[CLS]`): their text.

Used by `attendo tokenize`, the server's `/tokenize` and `return_token_ids`, and every `token`
field of the inspection views. `token_bytes` gives the bytes behind each label, for OpenAI's
logprobs `bytes` field (a client joins them to rebuild a character split over tokens).
"""

from __future__ import annotations

import codecs
import json
import re
import weakref
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

from attendo.tokenizer import TextTokenizer
from attendo.weights.gguf import byte_alphabet

BYTE_ERRORS = "attendo.hex-bytes"
BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


def _bytes_as_hex(error: UnicodeError) -> tuple[str, int]:
    assert isinstance(error, UnicodeDecodeError)
    return "".join(f"<0x{b:02X}>" for b in error.object[error.start : error.end]), error.end


codecs.register_error(BYTE_ERRORS, _bytes_as_hex)


def bytes_text(raw: bytes) -> str:
    """UTF-8 text, with every byte that is not part of a whole character shown as <0xXX>."""
    return raw.decode("utf-8", errors=BYTE_ERRORS)


def _decoder_types(tokenizer: TextTokenizer) -> set[str]:
    """The kinds of step the tokenizer's decoder is made of (e.g. {"Sequence", "Replace", "Strip"})."""
    decoder = tokenizer.backend.decoder
    if decoder is None:
        return set()
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                found.add(node["type"])
            if node.get("type") == "Replace" and node.get("pattern", {}).get("String") == "▁":
                found.add("Metaspace")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(decoder.__getstate__()))  # the decoder's own JSON, as tokenizer.json stores it
    return found


class TokenLabels:
    """Readable strings for one tokenizer's ids (computed once per id)."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.added = {i: t.content for i, t in tokenizer.backend.get_added_tokens_decoder().items()}
        kinds = _decoder_types(tokenizer)
        self.spell: Callable[[int, str], str]
        if "ByteLevel" in kinds:
            self.kind = "byte-level BPE"
            self.byte_of = {char: byte for byte, char in byte_alphabet().items()}
            self.spell = self._byte_level
        elif "Metaspace" in kinds:
            self.kind = "SentencePiece-style (▁ marks a space" + (", byte fallback)" if "ByteFallback" in kinds else ")")
            self.spell = lambda _, piece: piece.replace("▁", " ")
        elif "WordPiece" in kinds:
            self.kind = "WordPiece (## continues a word)"
            self.spell = lambda _, piece: piece
        else:
            self.kind = "other"
            self.spell = self._decoded
        self.label = lru_cache(maxsize=None)(self._label)
        self.bytes = lru_cache(maxsize=None)(self._bytes)

    def _label(self, token_id: int) -> str:
        if token_id in self.added:
            return self.added[token_id]
        piece = self.tokenizer.backend.id_to_token(token_id)
        if piece is None:
            return f"<id {token_id}>"  # past the tokenizer's vocabulary (a model may pad its table)
        return self.spell(token_id, piece)

    def _bytes(self, token_id: int) -> bytes:
        """The bytes the token adds to a text: a byte-level entry's bytes, a byte-fallback piece's
        one byte, else its label in UTF-8."""
        piece = None if token_id in self.added else self.tokenizer.backend.id_to_token(token_id)
        if piece is not None and self.kind == "byte-level BPE" and all(c in self.byte_of for c in piece):
            return bytes(self.byte_of[c] for c in piece)
        if piece is not None and (byte := BYTE_PIECE.fullmatch(piece)):
            return bytes([int(byte.group(1), 16)])
        return self.label(token_id).encode("utf-8")

    def _byte_level(self, _: int, piece: str) -> str:
        if not all(c in self.byte_of for c in piece):
            return piece  # an entry added as plain text
        return bytes_text(bytes(self.byte_of[c] for c in piece))

    def _decoded(self, token_id: int, piece: str) -> str:
        text = self.tokenizer.token_text(token_id)
        return piece if "\ufffd" in text else text


_labels: weakref.WeakKeyDictionary[TextTokenizer, TokenLabels] = weakref.WeakKeyDictionary()


def token_labels(tokenizer: TextTokenizer) -> TokenLabels:
    if tokenizer not in _labels:
        _labels[tokenizer] = TokenLabels(tokenizer)
    return _labels[tokenizer]


def readable_tokens(tokenizer: TextTokenizer, ids: Iterable[int]) -> list[str]:
    """The readable string of each id (see the module docstring)."""
    label = token_labels(tokenizer).label
    return [label(int(i)) for i in ids]


def readable_token(tokenizer: TextTokenizer, token_id: int) -> str:
    return token_labels(tokenizer).label(int(token_id))


def token_bytes(tokenizer: TextTokenizer, ids: Iterable[int]) -> list[bytes]:
    """The bytes behind each id's readable string (see TokenLabels._bytes)."""
    of = token_labels(tokenizer).bytes
    return [of(int(i)) for i in ids]
