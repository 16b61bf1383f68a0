"""Multi-head and grouped-query attention, with a fused fast path and an explicit path.

The fast path calls PyTorch's fused ``scaled_dot_product_attention``. The explicit path computes
softmax(Q Kᵀ · scale + bias) V step by step and hands the attention weights to a recorder; the
inspection tools use it, and tests check that both paths agree. A compiled training step on
the CPU takes the explicit path too (see attend), where it is the faster of the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from attendo import kernels
from attendo.config import ModelConfig
from attendo.layers.kv_cache import KVCache
from attendo.layers.norm import make_norm
from attendo.layers.positions import apply_rope

# The longest compiled causal pass on the CPU that takes the explicit path: its score matrices
# (batch, heads, tokens, tokens) stay small, and at 1024 tokens the fused kernel is as fast.
WRITTEN_OUT_TOKENS = 512


@dataclass
class EncoderMemory:
    """The encoder's output as the decoder's cross-attention reads it.

    states: (batch, source, dim); mask: bool (batch, 1, 1, source), False at padding, or None.
    Each decoder layer projects the states to its keys and values on first use and keeps them in
    `keys_values`: the encoder output does not change while the decoder generates, so this is the
    cross-attention's KV cache. `record`, when a list, collects the cross-attention weights
    (batch, heads, target, source) of each layer from the explicit path.
    """

    states: torch.Tensor
    mask: torch.Tensor | None
    keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    record: list[torch.Tensor] | None = None


@dataclass
class AttentionContext:
    """What every attention layer of one forward pass shares.

    mask: bool (batch, 1, queries, keys), True where a query may attend; or a float tensor added to
          the scores (-inf where it may not), used when the positions are a score bias (ALiBi, T5).
    rope: cos and sin, (batch, 1, queries, rope_dims), for rotary positions.
    cache/slots/kv_len: where this pass writes its keys and values and how many positions it reads
          (see KVCache.update); without a cache, keys are this pass's own tokens.
    record: when a list, the explicit path runs and appends each layer's weights
          (batch, heads, queries, keys).
    memory: the encoder output, for the cross-attention of an encoder-decoder's decoder.
    sliding_mask, sliding_rope: what the sliding-window layers use instead of mask and rope (the
          causal mask less the keys beyond the window; None: no mask, or the same rope).
    causal: mask is exactly the causal mask of a pass without a cache (query i sees keys 0..i), so
          the fused kernel may take is_causal instead of reading it (training, scoring).
    """

    positions: torch.Tensor
    mask: torch.Tensor | None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    cache: KVCache | None = None
    slots: torch.Tensor | None = None
    kv_len: int = 0
    record: list[torch.Tensor] | None = None
    memory: EncoderMemory | None = None
    sliding_mask: torch.Tensor | None = None
    sliding_rope: tuple[torch.Tensor, torch.Tensor] | None = None
    causal: bool = False


class Recorded(Exception):
    """Raised by a LayerRecord that ends the pass: every weight asked for is in hand."""


class LayerRecord(list):
    """A record (see AttentionContext.record) that keeps the weights of one layer only, so that
    looking at one layer of a long text holds one layer's weights, not every layer's. Each stack
    appends once per layer, in order; `layer` None keeps them all.

    With `end_pass`, recording that layer raises Recorded: the layers above it cannot change its
    weights, so the caller catches it instead of running them (layer 0 of 30 costs one layer)."""

    def __init__(self, layer: int | None = None, end_pass: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self.end_pass = end_pass and layer is not None
        self.seen = 0

    def append(self, weights: torch.Tensor) -> None:
        if self.layer is None or self.seen == self.layer:
            super().append(weights)
        self.seen += 1
        if self.end_pass and self.seen > self.layer:
            raise Recorded


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    record: list[torch.Tensor] | None,
    causal: bool = False,
) -> torch.Tensor:
    """q (batch, heads, queries, head_dim); k, v (batch, kv_heads, keys, head_dim). causal: the
    mask is the plain causal one (AttentionContext.causal).

    Without gradients, attendo.kernels' attention, whose result for a query depends on nothing
    but the keys it may see (torch's fused kernel differs in the last bits with the number of
    keys and with the mask, so a sequence would decode differently alone and in a batch)."""
    groups = q.shape[1] // k.shape[1]
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if record is None and not needs_grad and kernels.available():
        return kernels.attention(q, k, v, mask, scale).to(q.dtype)
    # A compiled causal pass on the CPU (a training step) of at most WRITTEN_OUT_TOKENS takes the
    # written-out products: the compiler fuses the mask and softmax around two batched matmuls,
    # which run at matmul speed, while the CPU's fused kernel's backward is slow (a quarter of the
    # step at 256 tokens). Longer passes keep the fused kernel, which never holds the score matrix.
    written_out = (
        causal and torch.compiler.is_compiling() and q.device.type == "cpu" and q.shape[2] <= WRITTEN_OUT_TOKENS
    )
    if record is None and not written_out:  # the fused kernel shares key/value heads itself
        if causal:  # it skips the keys above the diagonal: 30% less time at 1024 tokens
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=groups > 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=groups > 1)
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)).float() * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = scores.softmax(dim=-1)
    if record is not None:
        record.append(weights)
    return weights.to(v.dtype) @ v


class SelfAttention(nn.Module):
    """Queries, keys and values come from one fused projection (query heads first).

    A sliding-window layer attends only to the last sliding_window positions (its own included);
    with qk_norm, every query and key head is normalised before it is rotated.
    """

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.sliding = config.layer_type(layer) == "sliding"
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.scale = config.attention_scale or self.head_dim**-0.5
        self.qkv = nn.Linear(config.dim, config.qkv_dim, bias=config.qkv_bias)
        self.q_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.out = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=config.out_bias)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        q = q.view(batch, tokens, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, tokens, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, tokens, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rope = ctx.sliding_rope if self.sliding and ctx.sliding_rope is not None else ctx.rope
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer, k, v, ctx.positions, ctx.slots, ctx.kv_len)
        if self.sliding:
            out = attend(q, k, v, ctx.sliding_mask, self.scale, ctx.record)
        else:
            out = attend(q, k, v, ctx.mask, self.scale, ctx.record, ctx.causal)
        return self.out(out.transpose(1, 2).reshape(batch, tokens, -1))


class CrossAttention(nn.Module):
    """Queries from the decoder, keys and values from the encoder output (one fused projection).

    Keys and values are computed once per layer and generation and kept in the EncoderMemory.
    There is no position term: where a source token sits is already in its encoder state.
    """

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.scale = config.attention_scale or self.head_dim**-0.5
        self.q = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=config.qkv_bias)
        self.kv = nn.Linear(config.dim, 2 * config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.out = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=config.out_bias)

    def keys_values(self, memory: EncoderMemory) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layer not in memory.keys_values:
            batch, source, _ = memory.states.shape
            k, v = self.kv(memory.states).view(batch, source, 2, self.n_kv_heads, self.head_dim).unbind(2)
            memory.keys_values[self.layer] = (k.transpose(1, 2), v.transpose(1, 2))
        return memory.keys_values[self.layer]

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q = self.q(x).view(batch, tokens, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.keys_values(ctx.memory)
        out = attend(q, k, v, ctx.memory.mask, self.scale, ctx.memory.record)
        return self.out(out.transpose(1, 2).reshape(batch, tokens, -1))
