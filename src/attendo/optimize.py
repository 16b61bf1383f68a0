"""Speed-ups as passes over a loaded model; the model code itself stays as it reads.

- ``half_weights``: keep the linear layers' weights in 16 bits (float16 or bfloat16).
- ``quantize_weights``: weight-only quantization to 8 or 4 bits, in groups with their own scale
  and offset, the embedding table included. Decoding one token reads every weight once, so on a
  CPU it is limited by memory bandwidth: 1 byte (or half a byte) per weight instead of 4 is most
  of the speed-up, and the model takes a quarter (an eighth) of the memory. Activations and
  accumulation stay float32.
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
# The weight formats quantize_weights makes, by name.
QUANTIZED_BITS = {"int8": 8, "int4": 4}
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


class PackedLinear(nn.Module):
    """y = x Wᵀ + b with W quantized to `bits` (8 or 4) per weight, activations in float32.

    Layout: each row is cut into 32/bits equal slices ("planes"), and int32 word i of the row
    holds column i of every plane (plane j in bits j·bits and up). Each plane thus lines up with
    one contiguous slice of x: the compiled product reads every word once and keeps one running
    sum per plane, which lets the CPU overlap them. A plane's slice of a row is also its
    quantization group: w = scale·q + offset with q in [0, 2^bits). The words are stored as
    float32 bit patterns because torch.compile's CPU code loads float tensors a full vector at a
    time but copies int tensors element by element.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        self.bits, self.planes = bits, 32 // bits
        if in_features % self.planes:
            raise ValueError(f"{bits}-bit weights need in_features divisible by {self.planes}, got {in_features}")
        words = torch.empty(out_features, in_features // self.planes, dtype=torch.int32)
        scale, offset = torch.empty(out_features, self.planes), torch.empty(out_features, self.planes)
        for start in range(0, out_features, _CHUNK_ROWS):
            rows = slice(start, start + _CHUNK_ROWS)
            words[rows], scale[rows], offset[rows] = _quantize_rows(weight[rows].detach().float(), bits)
        self.register_buffer("words", words.view(torch.float32))
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.bias = bias

    @property
    def in_features(self) -> int:
        return self.words.shape[1] * self.planes

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The dequantized rows W[index] (index.shape + (in,)): an embedding lookup."""
        return self._dequantize(self.words[index], self.scale[index], self.offset[index])

    def dequantized(self) -> torch.Tensor:
        return self._dequantize(self.words, self.scale, self.offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if torch.compiler.is_compiling() and rows <= _VECTOR_ROWS:
            y = self._product_sums(x.reshape(rows, self.planes, -1)).view(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.dequantized().to(x.dtype))
        return y if self.bias is None else y + self.bias

    def _codes(self, words: torch.Tensor, plane: int) -> torch.Tensor:
        return (words.view(torch.int32) >> (self.bits * plane)) & ((1 << self.bits) - 1)

    def _dequantize(self, words: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        planes = [self._codes(words, j) * scale[..., j, None] + offset[..., j, None] for j in range(self.planes)]
        return torch.cat(planes, dim=-1)

    def _product_sums(self, x: torch.Tensor) -> torch.Tensor:
        """x (rows, planes, in/planes) → (rows, out): one sum per plane, fused into one loop; the
        offset of a plane multiplies the sum of its slice of x."""
        sums = [(self._codes(self.words, j).to(x.dtype) * x[:, None, j]).sum(-1) for j in range(self.planes)]
        slices = x.sum(-1)  # (rows, planes)
        return sum(s * self.scale[:, j] + slices[:, j, None] * self.offset[:, j] for j, s in enumerate(sums))


class PackedEmbedding(nn.Module):
    """Token embeddings looked up in a PackedLinear's rows (the LM head's, when the two are tied)."""

    def __init__(self, table: PackedLinear) -> None:
        super().__init__()
        self.table = table

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.rows(tokens)


def _quantize_rows(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float (rows, in) → int32 words (rows, in/planes), and each plane's scale and offset."""
    planes, top = 32 // bits, (1 << bits) - 1
    groups = weight.view(weight.shape[0], planes, -1)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = torch.where(high > low, (high - low) / top, torch.ones_like(low))
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, top).to(torch.int32)
    words = torch.zeros_like(codes[:, 0])
    for j in range(planes):
        words |= codes[:, j] << (bits * j)
    return words, scale, low


def half_weights(network: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Replace every nn.Linear (the LM head included) with a HalfLinear, in place."""
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, HalfLinear(child.weight, child.bias, dtype))
    return network


def quantize_weights(network: nn.Module, bits: int = 8) -> nn.Module:
    """Replace every nn.Linear with a PackedLinear and the token embedding with a PackedEmbedding,
    in place. A tied embedding shares the LM head's packed rows, as it shared its float ones. The
    rare layer whose input width does not divide into planes stays float."""
    planes = 32 // bits
    embed = getattr(network, "embed", None)
    head = getattr(network, "lm_head", None)
    tied = isinstance(embed, nn.Embedding) and isinstance(head, nn.Linear) and head.weight is embed.weight
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.in_features % planes == 0:
                setattr(module, name, PackedLinear(child.weight, child.bias, bits))
    if isinstance(embed, nn.Embedding) and embed.embedding_dim % planes == 0:
        table = network.lm_head if tied else PackedLinear(embed.weight, None, bits)
        network.embed = PackedEmbedding(table)
    return network


def compile_decode(network: nn.Module) -> Callable[..., torch.Tensor]:
    """The network's forward, compiled for fixed shapes (use it with a fixed-shape KV cache)."""
    return torch.compile(network, dynamic=False)
