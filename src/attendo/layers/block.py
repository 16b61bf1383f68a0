"""One transformer layer: attention then feed-forward, each inside a residual connection."""

from __future__ import annotations

import torch
from torch import nn

from attendo.config import ModelConfig
from attendo.layers.attention import AttentionContext, SelfAttention
from attendo.layers.feedforward import FeedForward
from attendo.layers.norm import make_norm


class Block(nn.Module):
    """Pre-norm (GPT-2, LLaMA, BLOOM): x + f(norm(x)). Post-norm (BERT, 2017): norm(x + f(x))."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.pre_norm = config.pre_norm
        self.attn_norm = make_norm(config)
        self.attn = SelfAttention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = FeedForward(config)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x), ctx)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x, ctx))
        return self.mlp_norm(x + self.mlp(x))
