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

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from attendo.errors import DataError, InvalidSettingError, UnsupportedModelError
from attendo.model import Model

TEXT_SUFFIXES = (".txt", ".md")
DEFAULT_WINDOW = 1024  # capped by the model's context length


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
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{path}: no {' or '.join(TEXT_SUFFIXES)} files in the folder")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path}: no such file or folder")
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    text = "\n\n".join(t for t in texts if t.strip())
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
    total, scored, windows, reached = 0.0, 0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        chunk = ids[begin:end]
        # Logits at position j predict chunk[j + 1]; score the tokens from `reached` on (but the
        # window's first token, which has no context in it: with stride = window, none is reached).
        first = max(reached, begin + 1) - begin - 1
        logits = model.logits(chunk[None])[0, first:-1]
        total += float(F.cross_entropy(logits, chunk[first + 1 :], reduction="sum"))
        scored += end - begin - 1 - first
        windows += 1
        reached = end
        if end == len(ids):
            break
    nll = total / scored
    return PerplexityResult(math.exp(nll), nll, scored, windows)
