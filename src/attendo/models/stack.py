"""A stack of blocks with its own positions: every encoder, and the decoder of an encoder-decoder.

BERT's encoder, the encoders of T5, BART and the 2017 Transformer, and their decoders are all this
one class: bidirectional or causal, with or without cross-attention. The decoder-only models keep
their own class (models/decoder.py), whose hot path serves continuous batching.
"""

from __future__ import annotations

import torch
from torch import nn

from attendo.config import ModelConfig
from attendo.errors import UnsupportedModelError
from attendo.layers.attention import AttentionContext, EncoderMemory
from attendo.layers.block import Block
from attendo.layers.kv_cache import KVCache
from attendo.layers.norm import make_norm
from attendo.layers.positions import relative_buckets, sinusoidal_table

STACK_POSITIONS = ("learned", "sinusoidal", "relative")


class Stack(nn.Module):
    """token embeddings → (× scale, + positions, norm) → N blocks → (final norm) → hidden states.

    The caller looks the tokens up, because the table is shared: by the encoder and decoder of
    T5 and BART, and with the output head where the model ties them.
    """

    def __init__(self, config: ModelConfig, n_layers: int, causal: bool, cross_attention: bool) -> None:
        super().__init__()
        if config.positions not in STACK_POSITIONS:
            raise UnsupportedModelError(
                f"{config.positions} positions are not implemented for {config.family} models "
                f"(supported: {', '.join(STACK_POSITIONS)})"
            )
        if config.has_sliding_layers:
            raise UnsupportedModelError(f"sliding-window attention is not implemented for {config.family} models")
        self.config = config
        self.causal = causal
        self.pos_embed = (
            nn.Embedding(config.context_length + config.position_offset, config.dim)
            if config.positions == "learned"
            else None
        )
        # T5: one learned bias per head and distance bucket, owned by the first layer in the
        # checkpoint and shared by every layer of the stack.
        self.relative_bias = (
            nn.Embedding(config.relative_buckets, config.n_heads) if config.positions == "relative" else None
        )
        self.embed_norm = make_norm(config) if config.embedding_norm else None
        self.blocks = nn.ModuleList(Block(config, layer, cross_attention) for layer in range(n_layers))
        self.norm = make_norm(config) if config.final_norm else None
        self.reset_tables()

    def reset_tables(self) -> None:
        """(Re)compute the fixed sinusoid table (a buffer that is never stored with the weights)."""
        if self.config.positions == "sinusoidal":
            device = next(self.parameters()).device
            table = sinusoidal_table(self.config.context_length, self.config.dim)
            self.register_buffer("sinusoids", table.to(device), persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        memory: EncoderMemory | None = None,
        record: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Hidden states (batch, tokens, dim) for token embeddings x (batch, tokens, dim).

        positions: (batch, tokens). attention_mask: bool (batch, tokens), False at padding that
        no token may attend to; or (batch, tokens, tokens), True where a query may attend to a
        key (texts packed side by side in a row, each kept to itself). cache: the decoder's
        self-attention KV cache (positions then say where each token goes). memory: the encoder
        output, for cross-attention.
        """
        config = self.config
        if config.embedding_scale != 1.0:
            x = x * config.embedding_scale
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions + config.position_offset)
        elif config.positions == "sinusoidal":
            x = x + self.sinusoids[positions].to(x.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        ctx = self._attention_context(positions, attention_mask, cache, memory, record, x.dtype)
        for block in self.blocks:
            x = block(x, ctx)
        return self.norm(x) if self.norm is not None else x

    def _attention_context(
        self,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: KVCache | None,
        memory: EncoderMemory | None,
        record: list[torch.Tensor] | None,
        dtype: torch.dtype,
    ) -> AttentionContext:
        if cache is None:
            kv_len, key_positions = positions.shape[1], positions[:, None, :]
        else:
            kv_len = int(positions.max()) + 1
            key_positions = torch.arange(kv_len, device=positions.device)[None, None, :]
        allowed = None  # bool (batch, 1, queries, keys); None: everything
        if self.causal:
            allowed = (key_positions <= positions[:, :, None])[:, None]
        if attention_mask is not None:
            keys = attention_mask.bool()
            keys = keys[:, None, None, :] if keys.dim() == 2 else keys[:, None]  # per key, or per query and key
            allowed = keys if allowed is None else allowed & keys
        mask = allowed
        if self.relative_bias is not None:
            distance = key_positions - positions[:, :, None]  # (batch, queries, keys): key minus query
            buckets = relative_buckets(
                distance, not self.causal, self.config.relative_buckets, self.config.relative_max_distance
            )
            bias = self.relative_bias(buckets).permute(0, 3, 1, 2).to(dtype)  # (batch, heads, queries, keys)
            mask = bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))
        return AttentionContext(positions, mask, None, cache, None, kv_len, record, memory)
