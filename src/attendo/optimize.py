"""Speed-ups as passes over a loaded model; the model code itself stays as it reads.

- ``half_weights``: keep the linear layers' weights in 16 bits. Decoding one token reads every
  weight once, so on a CPU it is limited by memory bandwidth: half the bytes, nearly twice the
  tokens per second. Activations and accumulation stay float32.
- ``compile_decode``: compile the network for the decode step with torch.compile. With a KV cache
  of fixed shapes every step has the same shapes, so it compiles once; the compiled step has no
  per-operation Python overhead and turns each 16-bit matrix-vector product into one loop that
  widens each weight as it reads it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Beyond this many rows a matrix multiply beats the product-and-sum form even when compiled.
_VECTOR_ROWS = 16


class HalfLinear(nn.Module):
    """y = x Wᵀ + b with W stored in float16 (or bfloat16) and x, y in float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().to(dtype))
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.shape[:-1].numel() <= _VECTOR_ROWS:
            # (rows, 1, in) * (out, in) summed over in: compiled into one pass over W.
            y = (x.unsqueeze(-2) * self.weight.to(x.dtype)).sum(-1)
        else:
            y = F.linear(x, self.weight.to(x.dtype))
        return y if self.bias is None else y + self.bias


def half_weights(network: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Replace every nn.Linear (the LM head included) with a HalfLinear, in place."""
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, HalfLinear(child.weight, child.bias, dtype))
    return network


def compile_decode(network: nn.Module) -> Callable[..., torch.Tensor]:
    """The network's forward, compiled for fixed shapes (use it with a fixed-shape KV cache)."""
    return torch.compile(network, dynamic=False)
