"""The decoder-only language model (GPT-2, LLaMA, SmolLM2, Mistral, Qwen2, BLOOM by config)."""

from __future__ import annotations

import torch
from torch import nn

from attendo.config import ModelConfig
from attendo.layers.attention import AttentionContext
from attendo.layers.block import Block
from attendo.layers.kv_cache import KVCache
from attendo.layers.norm import make_norm
from attendo.layers.positions import alibi_slopes, rope_cos_sin, rope_frequencies, sinusoidal_table

# Passes that start at position 0 (training, scoring a text) read their RoPE rotations from a table
# of the first positions, computed once: a compiled training step would otherwise recompute the
# float64 cos and sin inside every layer's kernels, forward and backward (an eighth of its time).
# The table holds at most this many positions (8 MB for 256-wide heads); longer passes and
# generation, which asks for positions of its own, compute the rotations they need.
ROPE_TABLE_POSITIONS = 4096


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap): logits squashed smoothly into (-cap, cap); None leaves them."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


class DecoderLM(nn.Module):
    """tokens → embedding (+ positions) → N blocks → final norm → LM head → logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.window = config.sliding_window if config.has_sliding_layers else None  # read every step
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embed = (
            nn.Embedding(config.context_length + config.position_offset, config.dim)
            if config.positions == "learned"
            else None
        )
        self.embed_norm = make_norm(config) if config.embedding_norm else None
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layers))
        self.norm = make_norm(config) if config.final_norm else None
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=config.head_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # What the KV cache keeps keys and values in; None: the activations' dtype. A 16-bit
        # cache halves what each decode step reads per cached token (attendo.load's kv_cache_dtype).
        self.kv_cache_dtype: torch.dtype | None = None
        self.reset_tables()

    def reset_tables(self) -> None:
        """(Re)compute the fixed position tables. They are buffers that follow from the config and
        are not stored with the weights, so a loader that built the model on the meta device calls
        this once the weights are in place."""
        config, device = self.config, next(self.parameters()).device
        if config.positions == "rope":
            # Plain attributes, not buffers: casting the network to float16 must not round them.
            self.rope_frequencies = rope_frequencies(config.rope_dims, config.rope_theta, config.rope_frequency_factors)
            self.sliding_rope_frequencies = None
            if config.rope_local_theta is not None and config.has_sliding_layers:
                self.sliding_rope_frequencies = rope_frequencies(config.rope_dims, config.rope_local_theta)
            first = torch.arange(min(config.context_length, ROPE_TABLE_POSITIONS), device="cpu")[None]
            self.rope_table = rope_cos_sin(first, self.rope_frequencies, config.rope_attention_factor)
            self.sliding_rope_table = None
            if self.sliding_rope_frequencies is not None:
                self.sliding_rope_table = rope_cos_sin(first, self.sliding_rope_frequencies)
        elif config.positions == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.n_heads).to(device), persistent=False)
        elif config.positions == "sinusoidal":
            table = sinusoidal_table(config.context_length, config.dim)
            self.register_buffer("sinusoids", table.to(device), persistent=False)

    def new_cache(self, slots: int, max_len: int | None = None, fixed_shapes: bool = False) -> KVCache:
        c = self.config
        # The activations' dtype: quantized weights live in buffers, the float parameters remain.
        like = next(self.parameters())
        return KVCache(
            c.n_layers, slots, c.n_kv_heads, max_len or c.context_length, c.head_dim, self.kv_cache_dtype or like.dtype,
            like.device,
            fixed_shapes,
        )

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        logits_index: torch.Tensor | None = None,
        record: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits (batch, tokens, vocab) for tokens (batch, tokens) at positions (batch, tokens).

        With a cache, keys and values are written to it and attention reads every earlier position
        of the sequence from it (prefill and decode are the same call). logits_index (batch,)
        computes the LM head at one position per row only and returns (batch, vocab): generation
        needs just the last token's logits, and the head is the largest matmul of a small model.
        """
        batch, length = tokens.shape
        from_start = positions is None  # every row reads positions 0 .. length - 1
        if from_start:
            positions = torch.arange(length, device=tokens.device).expand(batch, length)
        ctx = self._attention_context(positions, from_start, cache, slots, record)

        x = self.embed(tokens)
        if self.config.embedding_scale != 1.0:
            x = x * self.config.embedding_scale
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions + self.config.position_offset)
        elif self.config.positions == "sinusoidal":
            x = x + self.sinusoids[positions].to(x.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.run_blocks(x, ctx)
        if logits_index is not None:
            x = x[torch.arange(batch, device=x.device), logits_index]
        if self.norm is not None:
            x = self.norm(x)
        if self.config.logit_scale != 1.0:
            x = x * self.config.logit_scale
        return softcap(self.lm_head(x), self.config.final_logit_softcap)

    def run_blocks(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Every block in turn. (A speed-up pass may run them another way: attendo.fused.)"""
        for block in self.blocks:
            x = block(x, ctx)
        return x

    def _attention_context(
        self,
        positions: torch.Tensor,
        from_start: bool,
        cache: KVCache | None,
        slots: torch.Tensor | None,
        record: list[torch.Tensor] | None,
    ) -> AttentionContext:
        if cache is None:
            kv_len, key_positions = positions.shape[1], positions[:, None, :]
        else:
            kv_len = cache.max_len if cache.fixed_shapes else int(positions.max()) + 1
            key_positions = torch.arange(kv_len, device=positions.device)[None, None, :]
        query_positions = positions[:, :, None]
        mask = (key_positions <= query_positions)[:, None]  # (batch, 1, queries, keys)
        sliding_mask = None
        if self.window is not None:  # and no key further back than the window
            sliding_mask = mask & (key_positions > query_positions - self.window)[:, None]
        if cache is not None and not cache.fixed_shapes and positions.shape == (1, 1) and self.config.positions != "alibi":
            # One sequence's newest token sees every cached key: no mask, faster SDPA.
            mask = None
            if kv_len <= (self.window or 0):
                sliding_mask = None
        rope = sliding_rope = None
        if self.config.positions == "rope":
            from_table = from_start and positions.shape[1] <= self.rope_table[0].shape[2]
            rope = self._rotations(positions, from_table, self.rope_table, self.rope_frequencies, self.config.rope_attention_factor)
            if self.sliding_rope_frequencies is not None:
                sliding_rope = self._rotations(positions, from_table, self.sliding_rope_table, self.sliding_rope_frequencies)
        elif self.config.positions == "alibi":
            distance = (positions[:, :, None] - key_positions).float()[:, None]  # (batch, 1, q, k)
            bias = -self.alibi_slopes[None, :, None, None] * distance
            mask = bias.masked_fill(~mask, float("-inf"))
        # Without a cache, a pass from position 0 has exactly the causal mask (ALiBi's is a bias):
        # the fused kernel may skip it, and the blocks of keys above the diagonal.
        causal = from_start and cache is None and self.config.positions != "alibi"
        return AttentionContext(
            positions, mask, rope, cache, slots, kv_len, record, None, sliding_mask, sliding_rope, causal
        )

    @staticmethod
    def _rotations(
        positions: torch.Tensor,
        from_table: bool,
        table: tuple[torch.Tensor, torch.Tensor],
        frequencies: torch.Tensor,
        attention_factor: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos and sin for the positions: the table's first rows (1, 1, positions, rope_dims),
        when the pass starts at 0 and the table is long enough; the table's rows at the positions
        (batch, 1, positions, rope_dims) when every position is inside it (a decode step: one
        gather instead of a handful of float64 ops, and the same bits, since each entry is
        computed alone); else computed for these positions."""
        cos, sin = table
        if from_table:
            length = positions.shape[1]
            return cos[:, :, :length].to(positions.device), sin[:, :, :length].to(positions.device)
        inside = positions.device == cos.device and not torch.compiler.is_compiling()  # no data-dependent branch in a graph
        if inside and 0 <= int(positions.min()) and int(positions.max()) < cos.shape[2]:
            return cos[0, 0][positions][:, None], sin[0, 0][positions][:, None]
        return rope_cos_sin(positions, frequencies, attention_factor)
