"""Words and texts as points: their vectors, the angles between them, and a 2-D or 3-D picture.

The course's "distance between words as an angle". The vectors come from the model:
- an encoder-only model gives sentence embeddings (`model.embed`, pooled as the checkpoint says);
- a decoder-only or encoder-decoder model gives its input-embedding rows (the vectors the first
  layer reads), averaged over the text's tokens.
The cosine and angle of each pair are those of the vectors themselves (as `attendo similarity`
prints them); the picture is their projection on the first principal components (PCA: centre
the vectors, take the directions of largest variance from an SVD), with the share of the
variance each direction explains. Used by `/v1/inspect/embeddings` and `attendo embed-plot`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from attendo.errors import InvalidSettingError

if TYPE_CHECKING:
    from attendo.model import Model

MAX_INPUTS = 200
MAX_INPUT_CHARS = 2000
SENTENCE_EMBEDDINGS = "sentence embeddings"
INPUT_EMBEDDINGS = "input embeddings (mean over tokens)"


@dataclass(frozen=True)
class Geometry:
    source: str  # where the vectors come from: SENTENCE_EMBEDDINGS or INPUT_EMBEDDINGS
    vectors: torch.Tensor  # (n, dim)
    points: torch.Tensor  # (n, dims): the vectors on the first principal components
    explained_variance: list[float]  # share of the total variance along each of those components
    cosine: torch.Tensor  # (n, n)

    @property
    def angle_degrees(self) -> torch.Tensor:
        return torch.rad2deg(torch.arccos(self.cosine))

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "points": self.points.tolist(),
            "explained_variance": self.explained_variance,
            "cosine": self.cosine.tolist(),
            "angle_degrees": self.angle_degrees.tolist(),
        }


def check_inputs(texts: list[str]) -> None:
    if not 2 <= len(texts) <= MAX_INPUTS:
        raise InvalidSettingError(f"give from 2 to {MAX_INPUTS} words or texts, got {len(texts)}")
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise InvalidSettingError("every word or text must be a non-empty string")
        if len(text) > MAX_INPUT_CHARS:
            raise InvalidSettingError(f"each text may be at most {MAX_INPUT_CHARS} characters, got {len(text)}")


@torch.inference_mode()
def text_vectors(model: Model, texts: list[str]) -> tuple[torch.Tensor, str]:
    """(n, dim) float64 vectors for the texts, and what they are (see the module docstring)."""
    check_inputs(texts)
    if model.config.family == "encoder":
        return model.embed(texts).double(), SENTENCE_EMBEDDINGS
    rows = []
    for text in texts:
        ids = model.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise InvalidSettingError(f"{text!r} has no tokens")
        rows.append(model.network.embed(torch.tensor(ids)).double().mean(dim=0))
    return torch.stack(rows), INPUT_EMBEDDINGS


def pca(vectors: torch.Tensor, dims: int) -> tuple[torch.Tensor, list[float]]:
    """The centred vectors (n, dim) on their first `dims` principal components, (n, dims), and the
    share of the variance along each. With fewer independent directions than `dims` (two points
    span one), the missing coordinates are 0."""
    centred = vectors - vectors.mean(dim=0)
    _, singular, right = torch.linalg.svd(centred, full_matrices=False)
    rank = int((singular > singular[0] * 1e-9).sum()) if singular[0] > 0 else 0  # directions with any spread
    found = min(dims, rank)
    # An SVD's signs are arbitrary: make each direction's largest coordinate positive, so the
    # same vectors always give the same picture.
    axes = right[:found]
    axes = axes * torch.sign(axes.gather(1, axes.abs().argmax(dim=1, keepdim=True)))
    points = torch.zeros(vectors.shape[0], dims, dtype=vectors.dtype)
    points[:, :found] = centred @ axes.T
    variance = singular**2
    total = float(variance.sum())
    shares = [float(v) / total if total > 0 else 0.0 for v in variance[:found]]
    return points, shares + [0.0] * (dims - found)


def geometry(model: Model, texts: list[str], dims: int = 2) -> Geometry:
    if dims not in (2, 3):
        raise InvalidSettingError(f"dims must be 2 or 3, got {dims!r}")
    vectors, source = text_vectors(model, texts)
    points, shares = pca(vectors, dims)
    unit = F.normalize(vectors, dim=-1)
    cosine = (unit @ unit.T).clamp(-1.0, 1.0)
    return Geometry(source, vectors, points, shares, cosine)
