"""Feed-forward networks: the plain two-layer MLP and the gated one (SwiGLU, gated-GELU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attendo.config import ModelConfig

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class FeedForward(nn.Module):
    """down(act(gate(x)) * up(x)) when gated, else down(act(up(x))).

    The gate and up projections are one fused matrix (``up``, gate rows first) so a gated MLP
    does a single input matmul.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gated = config.mlp_gated
        self.activation = ACTIVATIONS[config.activation]
        up_rows = 2 * config.ffn_dim if self.gated else config.ffn_dim
        self.up = nn.Linear(config.dim, up_rows, bias=config.mlp_bias)
        self.down = nn.Linear(config.ffn_dim, config.dim, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.up(x)
        if self.gated:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = self.activation(gate) * up
        else:
            hidden = self.activation(hidden)
        return self.down(hidden)
