"""Speed-ups as passes over a loaded model; the model code itself stays as it reads.

- ``half_weights``: keep the linear layers' weights in 16 bits (float16 or bfloat16).
- ``int8_weights``: weight-only quantization: int8 weights with one scale per output row, the
  embedding table included. Decoding one token reads every weight once, so on a CPU it is limited
  by memory bandwidth: 1 byte per weight instead of 4 is most of the speed-up, and the model takes
  about a quarter of the memory. Activations and accumulation stay float32.
- ``compile_decode``: compile the network for the decode step with torch.compile. With a KV cache
  of fixed shapes every step has the same shapes, so it compiles once; the compiled step has no
  per-operation Python overhead and turns each matrix-vector product into one loop that widens
  each weight as it reads it.

The layers below pick their compiled form with ``torch.compiler.is_compiling()``: the eager path
(prefill, inspection) is the plain matrix multiply, and both forms compute the same product.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many rows, the compiled product-and-sum forms beat a matrix multiply.
_VECTOR_ROWS = 8
# int8 weights per int32 word.
_PLANES = 4
# Rows quantized at a time, so quantizing a large matrix needs little extra memory.
_CHUNK_ROWS = 4096


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


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W quantized to int8, one float32 scale per output row.

    Layout: the row's four quarters are interleaved into int32 words, byte j of word i holding
    column i + j·in/4, so each byte "plane" lines up with one contiguous quarter of x. The compiled
    product then reads every word once and keeps four independent sums (one per plane), which is
    what lets the CPU overlap them. The words are stored as float32 bit patterns because
    torch.compile's CPU code loads float tensors a full vector at a time but copies int tensors
    element by element.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        if in_features % _PLANES:
            raise ValueError(f"int8 weights need in_features divisible by {_PLANES}, got {in_features}")
        words = torch.empty(out_features, in_features // _PLANES, dtype=torch.int32)
        scale = torch.empty(out_features)
        for start in range(0, out_features, _CHUNK_ROWS):
            rows = slice(start, start + _CHUNK_ROWS)
            words[rows], scale[rows] = _quantize_rows(weight[rows].detach().float())
        self.register_buffer("words", words.view(torch.float32))
        self.register_buffer("scale", scale)
        self.bias = bias

    @property
    def in_features(self) -> int:
        return self.words.shape[1] * _PLANES

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The dequantized rows W[index] (index.shape + (in,)): an embedding lookup."""
        return _unpack(self.words[index].view(torch.int32)) * self.scale[index].unsqueeze(-1)

    def dequantized(self) -> torch.Tensor:
        return _unpack(self.words.view(torch.int32)) * self.scale.unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if torch.compiler.is_compiling() and rows <= _VECTOR_ROWS:
            y = self._product_sums(x.reshape(rows, _PLANES, -1)).view(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.dequantized().to(x.dtype))
        return y if self.bias is None else y + self.bias

    def _product_sums(self, x: torch.Tensor) -> torch.Tensor:
        """x (rows, planes, in/4) → (rows, out), as four sums (one per plane) fused into one loop."""
        words = self.words.view(torch.int32)
        sums = sum(
            (((words << (24 - 8 * j)) >> 24).to(x.dtype) * x[:, None, j]).sum(-1) for j in range(_PLANES)
        )
        return sums * self.scale


class Int8Embedding(nn.Module):
    """Token embeddings looked up in an Int8Linear's rows (the LM head's, when the two are tied)."""

    def __init__(self, table: Int8Linear) -> None:
        super().__init__()
        self.table = table

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.rows(tokens)


def _quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float (rows, in) → int32 words (rows, in/4) of four int8 planes, and the rows' scales."""
    peak = weight.abs().amax(dim=1)
    scale = torch.where(peak > 0, peak / 127, torch.ones_like(peak))
    q = torch.round(weight / scale[:, None]).to(torch.int32).view(weight.shape[0], _PLANES, -1)
    words = torch.zeros_like(q[:, 0])
    for j in range(_PLANES):
        words |= (q[:, j] & 0xFF) << (8 * j)
    return words, scale


def _unpack(words: torch.Tensor) -> torch.Tensor:
    """int32 words (..., in/4) → float (..., in): each byte sign-extended, planes side by side."""
    shifts = torch.tensor([24, 16, 8, 0], dtype=torch.int32, device=words.device)[:, None]
    planes = (words.unsqueeze(-2) << shifts) >> 24  # (..., planes, in/4)
    return planes.flatten(-2).float()


def half_weights(network: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Replace every nn.Linear (the LM head included) with a HalfLinear, in place."""
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, HalfLinear(child.weight, child.bias, dtype))
    return network


def int8_weights(network: nn.Module) -> nn.Module:
    """Replace every nn.Linear with an Int8Linear and the token embedding with an Int8Embedding,
    in place. A tied embedding shares the LM head's int8 rows, as it shared its float ones. The
    rare layer whose input width is not a multiple of 4 stays float."""
    embed = getattr(network, "embed", None)
    head = getattr(network, "lm_head", None)
    tied = isinstance(embed, nn.Embedding) and isinstance(head, nn.Linear) and head.weight is embed.weight
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.in_features % _PLANES == 0:
                setattr(module, name, Int8Linear(child.weight, child.bias))
    if isinstance(embed, nn.Embedding) and embed.embedding_dim % _PLANES == 0:
        table = network.lm_head if tied else Int8Linear(embed.weight, None)
        network.embed = Int8Embedding(table)
    return network


def compile_decode(network: nn.Module) -> Callable[..., torch.Tensor]:
    """The network's forward, compiled for fixed shapes (use it with a fixed-shape KV cache)."""
    return torch.compile(network, dynamic=False)
