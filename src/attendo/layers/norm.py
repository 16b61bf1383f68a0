"""Normalisation layers: LayerNorm (BERT, GPT-2, BLOOM) and RMSNorm (LLaMA, T5)."""

from __future__ import annotations

import torch
from torch import nn

from attendo.config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight), computed in float32 so half-precision weights keep full
    accuracy. Gemma stores its weights as differences from 1 (offset 1, weights start at 0)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = self.weight.float() + self.offset if self.offset else self.weight.float()
        return (normed * scale).to(x.dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    """The config's norm over the model dimension, or over `dim` features (a head, for q/k norms)."""
    if config.norm == "rmsnorm":
        return RMSNorm(dim or config.dim, config.norm_eps, config.norm_weight_offset)
    return nn.LayerNorm(dim or config.dim, eps=config.norm_eps, bias=config.norm_bias)
