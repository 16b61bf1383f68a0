"""The encoder-only model (BERT, MiniLM): bidirectional attention, hidden states for every token.

Its heads: the masked-language-model head (what word fits at [MASK]?) and, in the Model facade,
pooling of the hidden states into one sentence embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from attendo.config import ModelConfig
from attendo.errors import UnsupportedModelError
from attendo.layers.feedforward import ACTIVATIONS
from attendo.layers.norm import make_norm
from attendo.models.stack import Stack


class HeadTransform(nn.Module):
    """BERT's masked-LM head transform, before the output projection: norm(act(dense(x)))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.dim, config.dim, bias=config.mlp_bias)
        self.activation = ACTIVATIONS[config.activation]
        self.norm = make_norm(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.activation(self.dense(x)))


class EncoderLM(nn.Module):
    """tokens (+ segment types) → embeddings → bidirectional stack → hidden states (→ MLM logits)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.type_embed = nn.Embedding(config.token_types, config.dim) if config.token_types else None
        self.encoder = Stack(config, config.n_layers, causal=False, cross_attention=False)
        self.head_transform = HeadTransform(config) if config.lm_head and config.head_transform else None
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=config.head_bias) if config.lm_head else None
        if self.lm_head is not None and config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_tables(self) -> None:
        self.encoder.reset_tables()

    def hidden_states(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_types: torch.Tensor | None = None,
        record: list[torch.Tensor] | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(batch, tokens, dim) for tokens (batch, tokens); attention_mask False at padding;
        token_types (default all 0) say which segment of a sentence pair each token is in.

        Several texts packed into one row (see model_encoder.pack_texts) give their positions
        (batch, tokens), restarting with each text, and a (batch, tokens, tokens) attention_mask
        that keeps each text to itself."""
        batch, length = tokens.shape
        if positions is None:
            positions = torch.arange(length, device=tokens.device).expand(batch, length)
        x = self.embed(tokens)
        if self.type_embed is not None:
            x = x + self.type_embed(torch.zeros_like(tokens) if token_types is None else token_types)
        return self.encoder(x, positions, attention_mask=attention_mask, record=record)

    def forward(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_types: torch.Tensor | None = None,
        record: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Masked-LM logits (batch, tokens, vocab)."""
        if self.lm_head is None:
            raise UnsupportedModelError(
                "this checkpoint has no masked-language-model head (it gives hidden states and "
                "embeddings only); use a BERT checkpoint saved with its MLM head, such as bert-base-uncased"
            )
        x = self.hidden_states(tokens, attention_mask, token_types, record)
        if self.head_transform is not None:
            x = self.head_transform(x)
        return self.lm_head(x)
