"""Normalisation layers: LayerNorm (BERT, GPT-2, BLOOM) and RMSNorm (LLaMA, T5)."""

from __future__ import annotations

import torch
from torch import nn

from attendo.config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 so half-precision weights keep full accuracy."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.dim, config.norm_eps)
    return nn.LayerNorm(config.dim, eps=config.norm_eps, bias=config.norm_bias)
