"""The encoder-decoder model (the 2017 Transformer, T5 / FLAN-T5, BART): one Stack class used twice.

The encoder reads the whole input bidirectionally, once. The decoder is causal over what it has
written so far and, in every layer, cross-attends to the encoder output.
"""

from __future__ import annotations

import torch
from torch import nn

from attendo.config import ModelConfig
from attendo.layers.attention import EncoderMemory
from attendo.layers.kv_cache import KVCache
from attendo.models.stack import Stack


class EncoderDecoderLM(nn.Module):
    """source tokens → encoder → memory; target tokens + memory → decoder → LM head → logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)  # shared by both stacks
        self.encoder = Stack(config, config.n_layers, causal=False, cross_attention=False)
        self.decoder = Stack(config, config.decoder_layers, causal=True, cross_attention=True)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=config.head_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_tables(self) -> None:
        self.encoder.reset_tables()
        self.decoder.reset_tables()

    def new_cache(self, slots: int, max_len: int | None = None) -> KVCache:
        """The decoder's self-attention cache (cross-attention keys live in the EncoderMemory)."""
        c = self.config
        like = next(self.parameters())  # the activations' dtype: quantized weights live in buffers
        return KVCache(
            c.decoder_layers, slots, c.n_kv_heads, max_len or c.context_length, c.head_dim, like.dtype, like.device
        )

    def encode(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        record: list[torch.Tensor] | None = None,
    ) -> EncoderMemory:
        """Run the encoder over tokens (batch, source); attention_mask is False at padding."""
        batch, length = tokens.shape
        positions = torch.arange(length, device=tokens.device).expand(batch, length)
        states = self.encoder(self.embed(tokens), positions, attention_mask=attention_mask, record=record)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        return EncoderMemory(states, mask)

    def decode(
        self,
        tokens: torch.Tensor,
        memory: EncoderMemory,
        positions: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        record: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits (batch, tokens, vocab) for decoder tokens (batch, tokens) at positions
        (default 0, 1, ...); with a cache, earlier positions are read from it."""
        batch, length = tokens.shape
        if positions is None:
            positions = torch.arange(length, device=tokens.device).expand(batch, length)
        x = self.decoder(self.embed(tokens), positions, cache=cache, memory=memory, record=record)
        if self.config.logit_scale != 1.0:
            x = x * self.config.logit_scale
        return self.lm_head(x)

    def forward(
        self,
        tokens: torch.Tensor,
        decoder_tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder logits (batch, target, vocab), teacher-forced on decoder_tokens."""
        return self.decode(decoder_tokens, self.encode(tokens, attention_mask))
