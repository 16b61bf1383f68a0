"""Sentence embeddings: pool the hidden states of a text's tokens into one vector.

The course's "distance between words as an angle": texts with similar meaning get vectors that
point the same way, so their cosine similarity is high and the angle between them small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

PoolingMode = Literal["mean", "cls", "max", "mean_sqrt_len"]


@dataclass(frozen=True)
class Pooling:
    """How a model's sentence embedding is made (sentence-transformers' Pooling and Normalize).

    mode: average the real tokens ("mean"), take the first token's state ("cls", BERT's [CLS]),
    the feature-wise maximum ("max"), or the sum divided by sqrt(length) ("mean_sqrt_len").
    normalize: scale to unit length, so a dot product is the cosine similarity.
    max_length: longer texts are truncated to this many tokens (special tokens included).
    """

    mode: PoolingMode = "mean"
    normalize: bool = False
    max_length: int | None = None


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """(batch, tokens, dim) hidden states and a bool (batch, tokens) mask of real tokens → (batch, dim)."""
    hidden = hidden.float()
    real = attention_mask[..., None].to(hidden.dtype)
    if pooling.mode == "cls":
        vectors = hidden[:, 0]
    elif pooling.mode == "max":
        vectors = hidden.masked_fill(real == 0, float("-inf")).amax(dim=1)
    else:
        total, count = (hidden * real).sum(dim=1), real.sum(dim=1).clamp(min=1e-9)
        vectors = total / (count if pooling.mode == "mean" else count.sqrt())
    return F.normalize(vectors, p=2, dim=-1) if pooling.normalize else vectors
