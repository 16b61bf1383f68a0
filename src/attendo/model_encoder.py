"""The Model facade of an encoder-only network (BERT, MiniLM): embeddings and fill-mask, no generation."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attendo.errors import InvalidSettingError, UnsupportedModelError
from attendo.layers.attention import LayerRecord, Recorded
from attendo.layers.pooling import Pooling, pool
from attendo.model import Model, _as_batch
from attendo.models.encoder import EncoderLM
from attendo.tokenizer import TextTokenizer


@dataclass(frozen=True)
class MaskPrediction:
    token_id: int
    token: str
    probability: float
    text: str  # the input with the mask replaced by this token


@dataclass(frozen=True)
class PackedTexts:
    """Several texts side by side in each row of a batch, so padding is only what a row has left.

    tokens, positions: (rows, width); positions restart at 0 with each text.
    mask: bool (rows, width, width), True where a query may attend to a key: the tokens of its own
        text. The padding at the end of a row attends to itself, and no text attends to it.
    where: (texts, width) the index of each text's tokens in the flattened rows; real: bool
        (texts, width), False past a text's end (where its index means nothing).
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    where: torch.Tensor
    real: torch.Tensor

    def unpack(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, width, dim) states of the packed rows → (texts, width, dim), one text per row."""
        return hidden.flatten(0, 1)[self.where]


def pack_texts(ids: list[list[int]], pad: int) -> PackedTexts:
    """Pack texts into rows as wide as the longest: longest first, each into the first row with
    room for it (first-fit decreasing).

    Padding every text to the longest costs as much compute as real tokens, and in a batch of
    mixed lengths it can be a third of the work or more; packed, the rows are nearly full. The
    mask keeps each text to itself, so every text's states are what it would get alone.
    """
    width = max(len(i) for i in ids)
    rows: list[list[int]] = []  # the texts in each row
    room: list[int] = []
    for text in sorted(range(len(ids)), key=lambda i: -len(ids[i])):
        row = next((r for r, free in enumerate(room) if free >= len(ids[text])), len(rows))
        if row == len(rows):
            rows.append([])
            room.append(width)
        rows[row].append(text)
        room[row] -= len(ids[text])
    tokens, positions, owners = [], [], []  # owners: the text at each position, -1 at padding
    start = [0] * len(ids)  # where each text begins in the flattened rows
    for r, row in enumerate(rows):
        offset = r * width
        for text in row:
            start[text] = offset
            offset += len(ids[text])
        tokens.append([t for text in row for t in ids[text]] + [pad] * room[r])
        positions.append([p for text in row for p in range(len(ids[text]))] + [0] * room[r])
        owners.append([text for text in row for _ in ids[text]] + [-1] * room[r])
    owner = torch.tensor(owners)
    columns = torch.arange(width)
    real = columns < torch.tensor([len(i) for i in ids])[:, None]
    where = torch.where(real, torch.tensor(start)[:, None] + columns, 0)
    mask = owner[:, :, None] == owner[:, None, :]
    return PackedTexts(torch.tensor(tokens), torch.tensor(positions), mask, where, real)


class EncoderModel(Model):
    """A bidirectional encoder: every token sees the whole text, which suits understanding tasks
    (similarity, classification, filling a blank) rather than writing text."""

    network: EncoderLM

    def __init__(
        self,
        network: EncoderLM,
        tokenizer: TextTokenizer,
        generation_defaults: dict[str, Any],
        source: Path,
        pooling: Pooling | None = None,
        pooling_problem: str | None = None,
    ) -> None:
        super().__init__(network, tokenizer, generation_defaults, source)
        self.pooling = pooling or Pooling()
        self.pooling_problem = pooling_problem  # why the checkpoint's own pooling cannot run, if it cannot

    @property
    def has_mlm_head(self) -> bool:
        return self.network.lm_head is not None

    def _require_mlm_head(self) -> None:
        if not self.has_mlm_head:
            raise UnsupportedModelError(
                f"this checkpoint ({self.source}) has no masked-language-model head: it was saved for sentence "
                "embeddings only (try `embed` or `similarity`); fill-mask needs a BERT checkpoint "
                "with its MLM head, such as bert-base-uncased"
            )

    @torch.inference_mode()
    def logits(self, token_ids: torch.Tensor | list[list[int]]) -> torch.Tensor:
        """Masked-language-model logits (batch, positions, vocabulary) for token ids (batch, positions)."""
        self._require_mlm_head()
        return self.network(_as_batch(token_ids)).float()

    @torch.inference_mode()
    def hidden_states(self, token_ids: torch.Tensor | list[list[int]]) -> torch.Tensor:
        """The encoder output (batch, positions, dim): one contextual vector per token."""
        return self.network.hidden_states(_as_batch(token_ids)).float()

    @torch.inference_mode()
    def attention_maps(self, token_ids: torch.Tensor | list[list[int]], layer: int | None = None) -> torch.Tensor:
        """Attention weights (layers, batch, heads, query positions, key positions); with
        `layer`, that layer's only (the first axis is 1), and the layers above it are not run."""
        record = LayerRecord(layer, end_pass=True)
        with contextlib.suppress(Recorded):
            self.network.hidden_states(_as_batch(token_ids), record=record)
        return torch.stack(record)

    def _encode_text(self, text: str, max_length: int) -> list[int]:
        """Token ids with the model's special tokens; a long text loses its end, not its specials."""
        if not isinstance(text, str):
            raise InvalidSettingError(f"a text must be a string, got {type(text).__name__}")
        backend = self.tokenizer.backend
        encoding = backend.encode(text, add_special_tokens=False)
        room = max_length - backend.num_special_tokens_to_add(is_pair=False)
        if len(encoding.ids) > room:
            encoding.truncate(room)
        return backend.post_process(encoding).ids

    @torch.inference_mode()
    def embed(self, texts: str | list[str], normalize: bool | None = None, batch_size: int = 32) -> torch.Tensor:
        """Sentence embeddings (n, dim), pooled as the checkpoint's own pooling config says.

        normalize: override the checkpoint's choice of unit-length vectors.
        batch_size: at most this many texts per forward pass, packed into rows (see pack_texts).
        """
        if self.pooling_problem:
            raise UnsupportedModelError(self.pooling_problem)
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise InvalidSettingError("no texts given")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidSettingError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        pooling = self.pooling if normalize is None else Pooling(self.pooling.mode, normalize, self.pooling.max_length)
        max_length = min(pooling.max_length or self.config.context_length, self.config.context_length)
        pad = self.config.pad_token_id or 0
        vectors = []
        for start in range(0, len(texts), batch_size):
            packed = pack_texts([self._encode_text(t, max_length) for t in texts[start : start + batch_size]], pad)
            hidden = self.network.hidden_states(packed.tokens, packed.mask, positions=packed.positions)
            vectors.append(pool(packed.unpack(hidden), packed.real, pooling))
        return torch.cat(vectors)

    def mask_token(self) -> tuple[str, int]:
        """The tokenizer's mask token ([MASK] for BERT, <mask> for RoBERTa-style vocabularies)."""
        for token_id, added in sorted(self.tokenizer.backend.get_added_tokens_decoder().items()):
            if added.special and "mask" in added.content.lower():
                return added.content, token_id
        raise UnsupportedModelError(f"{self.source.name}: the tokenizer has no mask token")

    @torch.inference_mode()
    def fill_mask(self, text: str, top_k: int = 5) -> list[Any]:
        """The top_k likeliest tokens for the mask in text, with their probabilities.

        With several masks, one list per mask (each predicted independently)."""
        self._require_mlm_head()
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InvalidSettingError(f"top_k must be an integer >= 1, got {top_k!r}")
        mask, mask_id = self.mask_token()
        ids = self._encode_text(text, self.config.context_length)
        where = [i for i, t in enumerate(ids) if t == mask_id]
        if not where:
            raise InvalidSettingError(f"the text has no {mask} token to fill")
        probabilities = self.network(torch.tensor([ids]))[0, where].float().softmax(dim=-1)
        answers = []
        for position, probs in zip(where, probabilities):
            values, tokens = probs.topk(min(top_k, probs.shape[-1]))
            predictions = []
            for p, token in zip(values.tolist(), tokens.tolist()):
                filled = ids[:position] + [token] + ids[position + 1 :]
                predictions.append(MaskPrediction(token, self.tokenizer.token_text(token), p, self.tokenizer.decode(filled)))
            answers.append(predictions)
        return answers[0] if len(answers) == 1 else answers

    def _no_generation(self) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"this checkpoint ({self.source}) is an encoder-only model: it reads text but does not "
            "write it; use embed, similarity or fill_mask"
        )

    def generate(self, prompt: Any, **kwargs: Any) -> Any:
        raise self._no_generation()

    def stream(self, prompt: str, **kwargs: Any) -> Any:
        raise self._no_generation()
