"""Perplexity of a decoder-only model on a text, with a sliding window.

A text longer than the model's window is read in windows of `window` tokens that start every
`stride` tokens; each window scores only the tokens the previous window did not reach, with the
tokens before them (up to window - 1) as context. So every token after the first is scored once
(with stride = window, the windows do not overlap and a window's first token, which has no context
in it, is not scored), and a smaller stride gives each scored token more context (closer to the
model's best, slower).
This is the procedure of transformers' perplexity guide; here every token counts with the same
weight: perplexity = exp(total negative log-likelihood / tokens scored).

Input: a text file, or a folder whose .txt and .md files are read in name order and joined by a
blank line. Output: a PerplexityResult.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from attendo.datafiles import files_in, read_text_file
from attendo.errors import DataError, InvalidSettingError, UnsupportedModelError
from attendo.model import Model

TEXT_SUFFIXES = (".txt", ".md")
DEFAULT_WINDOW = 1024  # capped by the model's context length
BATCH_TOKENS = 2048  # tokens per forward pass: their float32 logits take 2048 × vocabulary × 4 bytes


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # tokens scored (every token of the text but the first, when stride < window)
    windows: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def read_text(path: str | Path) -> str:
    """A text file, or a folder's .txt/.md files (in name order, recursively) joined by a blank line."""
    path = Path(path)
    if path.is_dir():
        files = files_in(path, TEXT_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no {' or '.join(TEXT_SUFFIXES)} files in the folder")
    elif path.is_file():
        files = [path]  # any name: a single file is scored whatever its suffix (wiki.test.raw)
    else:
        raise DataError(f"{path}: no such file or folder")
    text = "\n\n".join(t for t in map(read_text_file, files) if t.strip())
    if not text.strip():
        raise DataError(f"{path}: no text to score (the file is empty)")
    return text


def window_sizes(model: Model, window: int | None, stride: int | None) -> tuple[int, int]:
    """(window, stride): default window min(context, 1024), default stride half the window."""
    context = model.config.context_length
    window = window or min(context, DEFAULT_WINDOW)
    if not 2 <= window <= context:
        raise InvalidSettingError(f"window must be between 2 and the model's context length {context}, got {window}")
    stride = stride or max(1, window // 2)
    if not 1 <= stride <= window:
        raise InvalidSettingError(f"stride must be between 1 and the window ({window}), got {stride}")
    return window, stride


def perplexity(model: Model, text: str, window: int | None = None, stride: int | None = None) -> PerplexityResult:
    """The model's perplexity on text (tokenized with the model's tokenizer, special tokens as
    the tokenizer adds them), read with a sliding window (see the module docstring)."""
    if model.config.family != "decoder":
        raise UnsupportedModelError(
            f"{model.source.name} is a {model.config.family} model; perplexity of a text needs a decoder-only "
            "model (evaluate an encoder-decoder on prompts and references with --data)"
        )
    window, stride = window_sizes(model, window, stride)
    ids = torch.tensor(model.tokenizer.encode(text), dtype=torch.long)
    if len(ids) < 2:
        raise DataError(f"the text is {len(ids)} token long: perplexity needs at least 2 tokens")
    spans = windows(len(ids), window, stride)
    total, scored = 0.0, 0
    # Windows of one length run as one batch of up to BATCH_TOKENS tokens: one pass over the
    # weights (and one dequantization of block-quantized ones) serves several windows.
    per_batch = max(1, BATCH_TOKENS // window)
    for _, same_length in itertools.groupby(spans, key=lambda span: span[1] - span[0]):
        same = list(same_length)
        for start in range(0, len(same), per_batch):
            group = same[start : start + per_batch]
            chunks = torch.stack([ids[begin:end] for begin, end, _ in group])
            logits = model.logits(chunks)  # (windows, window, vocab)
            for row, (begin, end, first) in enumerate(group):
                # Logits at position j predict token j + 1 of the window.
                total += float(F.cross_entropy(logits[row, first:-1], chunks[row, first + 1 :], reduction="sum"))
                scored += end - begin - 1 - first
    nll = total / scored
    return PerplexityResult(math.exp(nll), nll, scored, len(spans))


def windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) for each window over `length` tokens: it reads tokens [begin, end)
    and scores tokens begin + first + 1 to end - 1, the ones no earlier window reached (a
    window's own first token has no context in it, so it is never scored there)."""
    spans, reached = [], 0
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        spans.append((begin, end, max(reached, begin + 1) - begin - 1))
        reached = end
        if end == length:
            break
    return spans
