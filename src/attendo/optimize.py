"""Speed-ups as passes over a loaded model; the model code itself stays as it reads.

- ``quantize_weights``: weight-only quantization in ggml's block formats (Q8_0 for "int8", Q4_1
  for "int4"), the embedding table included: every 32 weights share a scale. Decoding one token
  reads every weight once, so on a CPU it is limited by memory bandwidth and by the work per
  weight: attendo.kernels multiplies by the blocks as bytes (or half bytes), with activations
  rounded to int8 per block, as llama.cpp does. A GGUF file's Q8_0/Q4_0/Q4_1 matrices are
  loaded straight into the same layers (see attendo.load).
- ``half_weights``: keep the linear layers' weights in 16 bits (float16 or bfloat16).
- ``compile_decode``: compile the network for the decode step with torch.compile. With a KV cache
  of fixed shapes every step has the same shapes, so it compiles once; the compiled step has no
  per-operation Python overhead, and the block products stay calls of the kernel.

HalfLinear picks its compiled form with ``torch.compiler.is_compiling()``: the eager path
(prefill, inspection) is the plain matrix multiply, and both forms compute the same product.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from torch import nn

from attendo import kernels
from attendo.weights import ggml_blocks

# Up to this many rows, the compiled product-and-sum form beats a matrix multiply.
_VECTOR_ROWS = 8
# Up to this many rows, the block kernel beats dequantizing for a float32 matrix multiply.
_KERNEL_ROWS = 64
# The weight formats quantize_weights makes, by the names users give them: ggml's own names, and
# int8/int4 for the formats closest to plain 8- and 4-bit weights.
QUANTIZED_FORMATS = {"int8": Q.Q8_0, "int4": Q.Q4_1, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
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


class BlockLinear(nn.Module):
    """y = x Wᵀ + b with W in one of ggml's block formats (Q8_0, Q4_0, Q4_1), as a GGUF file
    stores it: every 32 weights of a row share a float16 scale (and for Q4_1 a minimum).

    ``blocks`` holds the bytes, one row of W per row. Up to _KERNEL_ROWS rows of x (decoding)
    go through attendo.kernels' block product, which reads each weight once as the byte (or
    half byte) it is; more rows (a prompt) are cheaper as one float32 matrix multiply of the
    dequantized weights, and so is every product where no C compiler built the kernel.
    """

    def __init__(self, blocks: torch.Tensor, qtype: Q, in_features: int, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("blocks", blocks)
        self.qtype, self.in_features, self.out_features = qtype, in_features, blocks.shape[0]
        self.bias = bias
        # Asked once here: the answer is a cached build or load, which torch.compile cannot trace.
        self.use_kernel = kernels.available()

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, qtype: Q) -> BlockLinear:
        rows = [ggml_blocks.encode(chunk, qtype) for chunk in weight.split(_CHUNK_ROWS)]
        return cls(torch.cat(rows), qtype, weight.shape[1], bias)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The dequantized rows W[index] (index.shape + (in,)): an embedding lookup."""
        return ggml_blocks.decode(self.blocks[index].reshape(-1), self.qtype, (*index.shape, self.in_features))

    def dequantized(self) -> torch.Tensor:
        if self.use_kernel and not torch.compiler.is_compiling():
            return kernels.block_dequantize(self.blocks, int(self.qtype), self.in_features)
        return self.rows(torch.arange(self.out_features, device=self.blocks.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if rows <= _KERNEL_ROWS and self.use_kernel:
            y = kernels.block_matmul(x.reshape(rows, -1).float(), self.blocks, int(self.qtype), self.out_features)
            y = y.view(*x.shape[:-1], -1).to(x.dtype)
        else:
            y = F.linear(x, self.dequantized().to(x.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.qtype.name}"


class BlockEmbedding(nn.Module):
    """Token embeddings looked up in a BlockLinear's rows (the LM head's, when the two are tied)."""

    def __init__(self, table: BlockLinear) -> None:
        super().__init__()
        self.table = table

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.rows(tokens)


def _replace_linears(network: nn.Module, make: Callable[[nn.Linear], nn.Module | None]) -> None:
    """Put make(layer) in place of every nn.Linear for which it returns a module."""
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and (replacement := make(child)) is not None:
                setattr(module, name, replacement)


def half_weights(network: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Replace every nn.Linear (the LM head included) with a HalfLinear, in place."""
    _replace_linears(network, lambda layer: HalfLinear(layer.weight, layer.bias, dtype))
    return network


def quantize_weights(network: nn.Module, qtype: Q = Q.Q8_0) -> nn.Module:
    """Replace every nn.Linear with a BlockLinear and the token embedding with a BlockEmbedding,
    in place. A tied embedding shares the LM head's blocks, as it shared its float weights. The
    rare layer whose input width is not a whole number of blocks stays float."""
    embed = getattr(network, "embed", None)
    head = getattr(network, "lm_head", None)
    tied = isinstance(embed, nn.Embedding) and isinstance(head, nn.Linear) and head.weight is embed.weight
    _replace_linears(
        network,
        lambda layer: BlockLinear.quantize(layer.weight, layer.bias, qtype) if layer.in_features % ggml_blocks.BLOCK == 0 else None,
    )
    if isinstance(embed, nn.Embedding) and embed.embedding_dim % ggml_blocks.BLOCK == 0:
        table = network.lm_head if tied else BlockLinear.quantize(embed.weight, None, qtype)
        network.embed = BlockEmbedding(table)
    return network


def compile_decode(network: nn.Module) -> Callable[..., torch.Tensor]:
    """The network's forward, compiled for fixed shapes (use it with a fixed-shape KV cache).
    The step's own code is generated as C++ too (cpp_wrapper), not only its kernels: a decode
    step calls some 250 kernels, and calling each from Python cost about a third of the step."""
    return torch.compile(network, dynamic=False, options={"cpp_wrapper": True})
