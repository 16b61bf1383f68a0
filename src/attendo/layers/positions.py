"""Position schemes: how a transformer knows word order.

- learned absolute (GPT-2, BERT, BART): an embedding table indexed by position, added to tokens;
- sinusoidal (the 2017 Transformer): the same, but a fixed table of sines and cosines;
- RoPE (LLaMA): queries and keys are rotated by an angle proportional to their position;
- ALiBi (BLOOM): each head adds -slope * distance to its attention scores;
- relative buckets (T5): a learned bias per head and bucket of query-key distance.
"""

from __future__ import annotations

import math

import torch

# The fixed tables are computed on the CPU, even inside the loader's meta-device build: there,
# torch's Python reference kernels would run instead, and their first use imports 1.5 s of code.
_TABLES = "cpu"


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """(length, dim): sin on even features, cos on odd, wavelengths from 2*pi to 10000*2*pi."""
    position = torch.arange(length, dtype=torch.float32, device=_TABLES)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=_TABLES) * (-math.log(10_000.0) / dim))
    table = torch.zeros(length, dim, device=_TABLES)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


def rope_frequencies(rope_dims: int, theta: float, factors: tuple[float, ...] | None = None) -> torch.Tensor:
    """(rope_dims / 2,) float64 angles per position of each rotated pair: theta^(-2i / rope_dims),
    each divided by its factor when the RoPE is scaled for longer contexts."""
    frequencies = 1.0 / theta ** (torch.arange(0, rope_dims, 2, dtype=torch.float64, device=_TABLES) / rope_dims)
    if factors is not None:
        frequencies = frequencies / torch.tensor(factors, dtype=torch.float64, device=_TABLES)
    return frequencies


def rope_cos_sin(
    positions: torch.Tensor, frequencies: torch.Tensor, attention_factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (batch, 1, positions, rope_dims), for positions (batch, positions), in the
    half-split layout of Hugging Face checkpoints. Computed for the positions at hand rather than
    kept as a table: a table for Gemma 3's 32k context and 256-wide heads would take 64 MB. The
    angles are float64, since a float32 angle is off by up to 1e-3 radians at position 8000."""
    angles = positions[:, None, :, None].to(torch.float64) * frequencies.to(positions.device)
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos().float(), angles.sin().float()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] features of x (batch, heads, positions, head_dim).

    cos/sin are (batch, 1, positions, rope_dims). Feature i is paired with i + rope_dims/2.
    """
    rope_dims = cos.shape[-1]
    rotated, passed = x[..., :rope_dims], x[..., rope_dims:]
    first, second = rotated.chunk(2, dim=-1)
    rotated = (rotated * cos + torch.cat([-second, first], dim=-1) * sin).to(x.dtype)
    return torch.cat([rotated, passed], dim=-1) if passed.shape[-1] else rotated


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The geometric sequence of per-head slopes from the ALiBi paper (also for non-powers of 2)."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest < n_heads:
        extra_base = 2.0 ** (-4.0 / closest)
        slopes += [extra_base ** (2 * i + 1) for i in range(n_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32, device=_TABLES)


def relative_buckets(
    relative_position: torch.Tensor, bidirectional: bool, n_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucketing of (key - query) distances: exact for small distances, logarithmic beyond."""
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        n_buckets //= 2
        bucket += (relative_position > 0).long() * n_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    exact = n_buckets // 2
    is_small = distance < exact
    log_bucket = exact + (
        torch.log(distance.float().clamp(min=1) / exact)
        / math.log(max_distance / exact)
        * (n_buckets - exact)
    ).long()
    log_bucket = log_bucket.clamp(max=n_buckets - 1)
    return bucket + torch.where(is_small, distance, log_bucket)
