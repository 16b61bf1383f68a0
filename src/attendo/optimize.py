"""Speed-ups as passes over a loaded model; the model code itself stays as it reads.

- ``use_kernels``: every nn.Linear becomes a KernelLinear, whose product (when no gradient is
  needed) is attendo.kernels' batch-invariant one, so a sequence's logits are the same bits alone,
  in a batch, and prefilled in chunks. The loader applies it to every model it makes.
- ``quantize_weights``: weight-only quantization in ggml's block formats (Q8_0 for "int8", Q4_1
  for "int4"), the embedding table included: every 32 weights share a scale. Decoding one token
  reads every weight once, so on a CPU it is limited by memory bandwidth and by the work per
  weight: attendo.kernels multiplies by the blocks as bytes (or half bytes), with activations
  rounded to int8 per block, as llama.cpp does. A GGUF file's block matrices (Q8_0, Q4_0, Q4_1,
  Q5_0, Q5_1 and the K-quants) are loaded straight into the same layers (see attendo.load).
- ``half_weights``: keep the linear layers' weights in 16 bits (float16 or bfloat16).
- ``compile_decode``: compile the network for the decode step with torch.compile. With a KV cache
  of fixed shapes every step has the same shapes, so it compiles once; the compiled step has no
  per-operation Python overhead, and the products stay calls of the kernels.

Without a C compiler the kernels are missing; every layer then falls back to torch's own
product (of the dequantized weights, for blocks): the same values to rounding, but a row's
result may then depend on how many rows are computed together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from torch import nn

from attendo import kernels
from attendo.weights import ggml_blocks

# The weight formats quantize_weights makes, by the names users give them: ggml's own names, and
# int8/int4 for the formats closest to plain 8- and 4-bit weights.
QUANTIZED_FORMATS = {"int8": Q.Q8_0, "int4": Q.Q4_1, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
# Rows quantized at a time, so quantizing a large matrix needs little extra memory.
_CHUNK_ROWS = 4096


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd must see this product (training): then it is torch's own."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _kernel_product(x: torch.Tensor, weight: torch.Tensor, fmt: int, out_features: int, packed: bool = False) -> torch.Tensor:
    """x (..., in) · Wᵀ by the kernel, in x's dtype (the kernel works in float32)."""
    rows = x.shape[:-1].numel()
    y = kernels.matmul(x.reshape(rows, -1).float(), weight, fmt, out_features, packed)
    return y.view(*x.shape[:-1], out_features).to(x.dtype)


class KernelLinear(nn.Linear):
    """nn.Linear (same parameters, same training behaviour) whose product, when no gradient is
    needed, is the kernels' batch-invariant one for its float32/float16/bfloat16 weight."""

    use_kernel = False  # set by use_kernels, where the kernels are built

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_kernel or _needs_grad(x, self.weight, self.bias):
            return super().forward(x)
        y = _kernel_product(x, self.weight, kernels.weight_format(self.weight, None), self.out_features)
        return y if self.bias is None else y + self.bias


class HalfLinear(nn.Module):
    """y = x Wᵀ + b with W stored in float16 (or bfloat16) and x, y in float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().to(dtype))
        self.bias = bias
        self.out_features, self.in_features = weight.shape
        # Asked once here: the answer is a cached build or load, which torch.compile cannot trace.
        self.use_kernel = kernels.available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel:
            y = _kernel_product(x, self.weight, kernels.weight_format(self.weight, None), self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype))
        return y if self.bias is None else y + self.bias


class BlockLinear(nn.Module):
    """y = x Wᵀ + b with W in one of ggml's block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K...
    Q6_K), as a GGUF file stores it: every 32 (or 256) weights of a row share a float16 scale.

    ``blocks`` holds the bytes: one row of W per row, or for the common formats the same bytes
    packed 16 rows together (see attendo.kernels.pack). attendo.kernels multiplies by them as
    they are (reading each weight once as the bits it is), for any number of rows of x; where no C
    compiler built the kernels, the product is a float32 matrix multiply of the dequantized
    weights (which only Q8_0, Q4_0 and Q4_1 can do without the kernels: the loader keeps other
    formats as blocks only where the kernels exist).
    """

    def __init__(self, blocks: torch.Tensor, qtype: Q, in_features: int, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.qtype, self.in_features, self.out_features = qtype, in_features, blocks.shape[0]
        self.row_bytes = blocks.shape[1]
        self.bias = bias
        # Asked once here: the answer is a cached build or load, which torch.compile cannot trace.
        self.use_kernel = kernels.supports(int(qtype), in_features)
        # The kernels' packed layout (16 rows interleaved, the same bytes) where they have one.
        self.packed = self.use_kernel and kernels.packs(int(qtype))
        self.register_buffer("blocks", kernels.pack(blocks, int(qtype), in_features) if self.packed else blocks)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, qtype: Q) -> BlockLinear:
        rows = [ggml_blocks.encode(chunk, qtype) for chunk in weight.split(_CHUNK_ROWS)]
        return cls(torch.cat(rows), qtype, weight.shape[1], bias)

    def file_blocks(self) -> torch.Tensor:
        """W's blocks in the file's layout (out, bytes per row), whatever layout they are kept in."""
        if not self.packed:
            return self.blocks
        return kernels.unpack_rows(self.blocks, int(self.qtype), self.in_features, torch.arange(self.out_features), self.row_bytes)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """The dequantized rows W[index] (index.shape + (in,)): an embedding lookup."""
        if self.use_kernel and not torch.compiler.is_compiling():
            values = kernels.dequantize(self.blocks, int(self.qtype), self.in_features, index, self.packed, self.out_features)
            return values.view(*index.shape, self.in_features)
        return ggml_blocks.decode(self.blocks[index].reshape(-1), self.qtype, (*index.shape, self.in_features))

    def dequantized(self) -> torch.Tensor:
        return self.rows(torch.arange(self.out_features, device=self.blocks.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel:
            y = _kernel_product(x, self.blocks, int(self.qtype), self.out_features, self.packed)
        else:
            y = F.linear(x, self.dequantized().to(x.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.qtype.name}"


class StackedLinear(nn.Module):
    """One linear layer whose output rows come from several layers stacked: a fused projection
    (q/k/v, gate/up) whose source matrices a file stores in different block formats, as a
    Q4_K_M file stores v in Q6_K beside q and k in Q4_K. y = cat(part(x) for part in parts) + b."""

    def __init__(self, parts: Sequence[nn.Module], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.bias = bias
        self.in_features = parts[0].in_features
        self.out_features = sum(part.out_features for part in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([part(x) for part in self.parts], dim=-1)
        return y if self.bias is None else y + self.bias


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


def use_kernels(network: nn.Module) -> nn.Module:
    """Make every plain nn.Linear a KernelLinear sharing its parameters (tied weights stay tied),
    in place; a no-op where the kernels could not be built."""
    if kernels.available():
        _replace_linears(network, _kernel_linear)
    return network


def _kernel_linear(layer: nn.Linear) -> KernelLinear | None:
    if type(layer) is not nn.Linear or not kernels.supports(kernels.weight_format(layer.weight, None), layer.in_features):
        return None
    replacement = KernelLinear(layer.in_features, layer.out_features, bias=False, device="meta")
    replacement.weight, replacement.bias = layer.weight, layer.bias
    replacement.use_kernel = True
    return replacement


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
    # The step asks kernels.available() (attendo.layers.attention); its answer never changes.
    # Marked here, not where it is defined: marking imports the compiler (1.5 s, 70 MB).
    torch.compiler.assume_constant_result(kernels.available)
    return torch.compile(network, dynamic=False, options={"cpp_wrapper": True})
