"""One transformer layer: attention then feed-forward, each inside a residual connection."""

from __future__ import annotations

import torch
from torch import nn

from attendo.config import ModelConfig
from attendo.layers.attention import AttentionContext, CrossAttention, SelfAttention
from attendo.layers.feedforward import FeedForward
from attendo.layers.norm import make_norm


class Block(nn.Module):
    """Pre-norm (GPT-2, LLaMA, BLOOM, T5): x + f(norm(x)). Post-norm (BERT, BART, 2017): norm(x + f(x)).
    With sublayer norms (Gemma 2/3), pre-norm also normalises what f returns: x + norm'(f(norm(x))).

    f is self-attention, then (in the decoder of an encoder-decoder) cross-attention over the
    encoder output, then the feed-forward network; each sits in its own residual connection.
    """

    def __init__(self, config: ModelConfig, layer: int, cross_attention: bool = False) -> None:
        super().__init__()
        self.pre_norm = config.pre_norm
        self.attn_norm = make_norm(config)
        self.attn = SelfAttention(config, layer)
        self.cross_norm = make_norm(config) if cross_attention else None
        self.cross = CrossAttention(config, layer) if cross_attention else None
        self.mlp_norm = make_norm(config)
        self.mlp = FeedForward(config)
        self.attn_post_norm = make_norm(config) if config.sublayer_norms else None
        self.mlp_post_norm = make_norm(config) if config.sublayer_norms else None

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.pre_norm:
            x = x + _maybe(self.attn_post_norm, self.attn(self.attn_norm(x), ctx))
            if self.cross is not None:
                x = x + self.cross(self.cross_norm(x), ctx)
            return x + _maybe(self.mlp_post_norm, self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.attn(x, ctx))
        if self.cross is not None:
            x = self.cross_norm(x + self.cross(x, ctx))
        return self.mlp_norm(x + self.mlp(x))


def _maybe(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)
