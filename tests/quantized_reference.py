"""The reference for models with block-quantized weights (attendo.optimize.BlockLinear).

It is the same model doing in plain torch what the kernel does: weights rounded to the format's
grid and activations rounded to int8 per block of 32 (per 256 for the K-quants, as llama.cpp's
Q8_K: the value of largest magnitude becomes ±127).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from gguf import GGMLQuantizationType as Q

from attendo import fused
from attendo.optimize import BlockLinear


def activations_rounded(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernel rounds it: int8 per block of 32 with scale max|x|/127, in the
    same float32 operations (times the reciprocal), so that no code rounds the other way."""
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inverse = torch.where(scale > 0, 1 / scale, 0)
    return (torch.round(blocks * inverse) * scale).reshape(x.shape)


def activations_rounded_256(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernel rounds it for the K-quants: int8 per 256 with scale extreme/-127."""
    blocks = x.reshape(*x.shape[:-1], -1, 256)
    extreme = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))
    inverse = torch.where(extreme != 0, -127 / extreme, 0)
    codes = torch.round(inverse * blocks).clamp(-127, 127)
    return (codes * torch.where(inverse != 0, 1 / inverse, 0)).reshape(x.shape)


def reference_forward(layer: BlockLinear, x: torch.Tensor) -> torch.Tensor:
    """BlockLinear.forward in plain torch: the rounding of the kernel, none of its code."""
    if layer.use_kernel:
        x = activations_rounded_256(x) if layer.qtype >= Q.Q2_K else activations_rounded(x)
    y = F.linear(x, layer.dequantized())
    return y if layer.bias is None else y + layer.bias


@contextmanager
def products_checked() -> Iterator[list[bool]]:
    """While open, every BlockLinear product is also computed by reference_forward on the same
    input; the list collects whether each pair agreed.

    Checking products one by one is what can be exact: over a whole model, an activation one
    float32 step from a rounding boundary can round the other way after an earlier layer's
    tiny difference, so whole-model outputs agree only closely."""
    agreed: list[bool] = []
    kernel_forward = BlockLinear.forward

    def checked(layer: BlockLinear, x: torch.Tensor) -> torch.Tensor:
        y = kernel_forward(layer, x)
        expected = reference_forward(layer, x)
        # float32 sums in another order: equal to a few units in the last place of the largest
        agreed.append(bool((y - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-6))
        return y

    with pytest.MonkeyPatch.context() as patch, fused.disabled():  # every product through forward
        patch.setattr(BlockLinear, "forward", checked)
        yield agreed


@contextmanager
def reference_products() -> Iterator[None]:
    """While open, every BlockLinear computes reference_forward instead of its own product."""
    with pytest.MonkeyPatch.context() as patch, fused.disabled():
        patch.setattr(BlockLinear, "forward", reference_forward)
        yield

