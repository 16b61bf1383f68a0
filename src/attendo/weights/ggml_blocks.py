"""ggml's block formats: which ones attendo multiplies by, and the three most common encoded and
decoded with torch operations.

Each format stores a row as blocks of 32 values sharing a float16 scale (and, for Q4_1, a
minimum). Decoding them with vectorized torch ops is an order of magnitude faster than the gguf
package's generic numpy code, which matters for start-up time where the kernels are missing;
with them, attendo.kernels dequantizes every format. Encoding is what quantizing a float model
to these formats takes (attendo.kernels multiplies by them as they are).

    Q8_0: [d: f16][q: 32 x int8]                        value = d * q
    Q4_0: [d: f16][16 bytes: low nibbles, high nibbles] value = d * (q - 8)
    Q4_1: [d: f16][m: f16][16 bytes as Q4_0]            value = d * q + m

The other formats attendo.kernels multiplies by (their layouts are spelled out in
kernels/matmul.c): Q5_0 and Q5_1 (Q4_0/Q4_1 with a fifth bit per value), and the K-quants, whose
blocks of 256 values have a scale (and minimum) per sub-block of 16 or 32: Q2_K, Q3_K, Q4_K,
Q5_K, Q6_K.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as Q

BLOCK = 32
_BLOCK_BYTES = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}
DECODABLE = frozenset(_BLOCK_BYTES) | {Q.F32, Q.F16, Q.BF16}
# The formats attendo.kernels multiplies by directly.
MULTIPLIABLE = frozenset(_BLOCK_BYTES) | {Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}


def _f16(block_bytes: torch.Tensor) -> torch.Tensor:
    """Two bytes per block → the float16 they encode, as float32 (rows, blocks)."""
    return block_bytes.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(rows, blocks, 16) bytes → (rows, blocks, 32) values 0..15: the low nibbles are the first
    16 values of the block, the high nibbles the last 16."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def encode(values: torch.Tensor, qtype: Q) -> torch.Tensor:
    """float (rows, in) with in a multiple of 32 → the rows in `qtype` as bytes (rows, in/32 x block
    bytes), rounded to the nearest code as llama.cpp's reference quantizer does."""
    rows = values.shape[0]
    blocks = values.detach().float().reshape(rows, -1, BLOCK)
    if qtype == Q.Q8_0:
        scale = blocks.abs().amax(dim=-1) / 127
        codes = _divide(blocks, scale).round().to(torch.int8).view(torch.uint8)
        parts = [_half_bytes(scale), codes]
    elif qtype == Q.Q4_1:
        low, high = blocks.amin(dim=-1), blocks.amax(dim=-1)
        scale = (high - low) / 15
        codes = _divide(blocks - low[..., None], scale).round().clamp(0, 15).to(torch.uint8)
        parts = [_half_bytes(scale), _half_bytes(low), _pack_nibbles(codes)]
    elif qtype == Q.Q4_0:
        # the value of largest magnitude maps to code 0, keeping its sign exact
        extreme = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        scale = extreme / -8
        codes = (_divide(blocks, scale).round() + 8).clamp(0, 15).to(torch.uint8)
        parts = [_half_bytes(scale), _pack_nibbles(codes)]
    else:
        raise ValueError(f"cannot encode {qtype.name}")
    return torch.cat(parts, dim=-1).reshape(rows, -1)


def _divide(blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """blocks / scale per block; an all-zero block (scale 0) gives codes 0."""
    inverse = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    return blocks * inverse[..., None]


def _half_bytes(scale: torch.Tensor) -> torch.Tensor:
    """(rows, blocks) float → (rows, blocks, 2) bytes of the float16 it rounds to."""
    return scale.to(torch.float16).unsqueeze(-1).view(torch.uint8)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(rows, blocks, 32) codes 0..15 → (rows, blocks, 16) bytes; the inverse of _nibbles."""
    return codes[..., : BLOCK // 2] | (codes[..., BLOCK // 2 :] << 4)


def decode(raw: torch.Tensor, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    """raw: the tensor's bytes (uint8, 1-D); returns float32 values of the given (torch) shape."""
    if qtype == Q.F32:
        return raw.view(torch.float32).reshape(shape)
    if qtype == Q.F16:
        return raw.view(torch.float16).reshape(shape).float()
    if qtype == Q.BF16:
        return raw.view(torch.bfloat16).reshape(shape).float()
    blocks = raw.reshape(-1, _BLOCK_BYTES[qtype])
    if qtype == Q.Q8_0:
        values = blocks[:, 2:].view(torch.int8).float() * _f16(blocks[:, :2])[:, None]
    elif qtype == Q.Q4_0:
        values = (_nibbles(blocks[:, 2:]).float() - 8) * _f16(blocks[:, :2])[:, None]
    else:
        values = _nibbles(blocks[:, 4:]).float() * _f16(blocks[:, :2])[:, None] + _f16(blocks[:, 2:4])[:, None]
    return values.reshape(shape)
