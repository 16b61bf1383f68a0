"""Every block format attendo.kernels multiplies by, the K-quants and Q5_0/Q5_1 beside Q8_0/Q4_0/
Q4_1: dequantized exactly as gguf's own code (gguf.quants) dequantizes them, multiplied to float32
rounding of the reference (the same activation rounding, times gguf's dequantized weights, in
float64), on random blocks, by the native, AVX2-only and plain C builds alike.

A tiny GGUF whose matrices mix formats the way a Q4_K_M file does (q and k in one format, v in
another) loads with every matrix in its file's blocks, taking exactly the file's bytes, and
gives the logits of the same model computed with the reference products. Broken K-quant tensors
are one-line errors.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize
from quantized_reference import activations_rounded, activations_rounded_256, products_checked, reference_products
from test_gguf_reader import add_metadata, byte_level_vocab, gguf_name, hf_llama, patch, tensor_info_at

import attendo
from attendo import kernels
from attendo.cli import main
from attendo.errors import CheckpointError
from attendo.optimize import BlockLinear, StackedLinear
from attendo.weights.gguf import read_header

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"no kernels: {kernels.unavailable_reason()}")

FORMATS = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# Where each format keeps its float16 scales: d (and dmin or m) at these byte offsets of a block.
SCALES_AT = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q2_K: [80, 82],
             Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}  # fmt: skip


def random_blocks(qtype: Q, rows: int, in_features: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, bytes per row) of random blocks whose scales are small finite float16 numbers
    (random bytes would make NaN scales; gguf cannot quantize the K-quants in numpy)."""
    values, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * in_features // values, size), dtype=np.uint8)
    for offset in SCALES_AT[qtype]:
        scales = rng.uniform(-0.05, 0.05, blocks.shape[0]).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def ggufs_weights(blocks: np.ndarray, qtype: Q, in_features: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(dequantize(blocks, qtype), dtype=np.float32).reshape(-1, in_features))


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
def test_dequantization_equals_ggufs(qtype):
    blocks = random_blocks(qtype, 7, 512, np.random.default_rng(int(qtype)))
    layer = BlockLinear(torch.from_numpy(blocks), qtype, 512)
    expected = ggufs_weights(blocks, qtype, 512)
    assert torch.equal(layer.dequantized(), expected)
    index = torch.tensor([[6, 0], [3, 3]])
    assert torch.equal(layer.rows(index), expected[index])


def reference_product(x: torch.Tensor, blocks: np.ndarray, qtype: Q) -> torch.Tensor:
    """The kernel's product computed independently: x rounded to int8 as llama.cpp rounds it for
    the format, times gguf's dequantized weights, in float64."""
    rounded = activations_rounded_256(x) if qtype >= Q.Q2_K else activations_rounded(x)
    return rounded.double() @ ggufs_weights(blocks, qtype, x.shape[-1]).double().T


def as_laid_out(blocks: np.ndarray, qtype: Q, layout: str) -> tuple[torch.Tensor, bool]:
    """The blocks as the kernels take them: in the file's layout, or packed 16 rows together."""
    if layout == "file":
        return torch.from_numpy(blocks), False
    if not kernels.packs(int(qtype)):
        pytest.skip(f"{qtype.name} has no packed layout in this build")
    packed = kernels.pack(torch.from_numpy(blocks), int(qtype), blocks.shape[1] // GGML_QUANT_SIZES[qtype][1] * GGML_QUANT_SIZES[qtype][0])
    return packed, True


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [1, 3, 5, 17])
@pytest.mark.parametrize("layout", ["file", "packed"])
def test_product_equals_the_rounded_reference(qtype, rows, layout):
    rng = np.random.default_rng(rows)
    blocks = random_blocks(qtype, 33, 768, rng)  # 33 rows: two whole panels of 16 and one row
    x = torch.from_numpy(rng.standard_normal((rows, 768), dtype=np.float32)) * 3
    weight, packed = as_laid_out(blocks, qtype, layout)
    got = kernels.matmul(x, weight, int(qtype), 33, packed)
    expected = reference_product(x, blocks, qtype)
    assert ((got.double() - expected).abs().max() / expected.abs().max()) < 1e-6
    assert all(torch.equal(kernels.matmul(x[i : i + 1], weight, int(qtype), 33, packed), got[i : i + 1]) for i in range(rows))


@pytest.mark.parametrize("qtype", [q for q in FORMATS if kernels.packs(int(q))], ids=lambda q: q.name)
def test_packing_moves_bytes_and_back(qtype):
    blocks = random_blocks(qtype, 37, 512, np.random.default_rng(5))
    packed, _ = as_laid_out(blocks, qtype, "packed")
    assert packed.numel() == 48 * blocks.shape[1]  # the same bytes, and zero rows up to 48
    back = kernels.unpack_rows(packed, int(qtype), 512, torch.arange(37), blocks.shape[1])
    assert np.array_equal(back.numpy(), blocks)
    assert torch.equal(kernels.dequantize(packed, int(qtype), 512, packed=True, rows=37), ggufs_weights(blocks, qtype, 512))


@pytest.mark.parametrize("flags", [kernels.AVX2_ONLY, kernels.PORTABLE], ids=["avx2", "plain-c"])
def test_other_builds_compute_the_same_products(flags):
    """What AVX2-only machines (and CPUs without AVX2) build, checked on this one."""
    native = kernels.library
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((5, 512), dtype=np.float32))
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(kernels, "library", lambda *_: native(flags))
        assert kernels.unavailable_reason() is None
        for qtype in FORMATS:
            blocks = random_blocks(qtype, 19, 512, rng)
            expected = reference_product(x, blocks, qtype)
            for layout in ("file", "packed") if kernels.packs(int(qtype)) else ("file",):
                weight, packed = as_laid_out(blocks, qtype, layout)
                got = kernels.matmul(x, weight, int(qtype), 19, packed)
                assert ((got.double() - expected).abs().max() / expected.abs().max()) < 1e-6, (qtype.name, layout)
            assert torch.equal(kernels.dequantize(torch.from_numpy(blocks), int(qtype), 512), ggufs_weights(blocks, qtype, 512))


# --- a tiny GGUF in the formats of a Q4_K_M file ----------------------------------------------

SIZES = {"hidden": 256, "ffn": 512, "layers": 2, "heads": 4, "kv_heads": 2, "context": 128}
# As llama.cpp's Q4_K_M mixes them: v and down in Q6_K, the rest in Q4_K, a Q5_0 gate.
MIXED = {"attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q6_K, "attn_output": Q.Q5_K, "ffn_gate": Q.Q5_0,
         "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K, "token_embd": Q.Q8_0, "output": Q.Q6_K}  # fmt: skip


def write_mixed_gguf(path: Path) -> Path:
    tokens, types, merges = byte_level_vocab()
    weights = hf_llama(len(tokens), tied=False, **SIZES)
    writer = GGUFWriter(path, "llama")
    writer.add_context_length(SIZES["context"])
    writer.add_embedding_length(SIZES["hidden"])
    writer.add_feed_forward_length(SIZES["ffn"])
    writer.add_block_count(SIZES["layers"])
    writer.add_head_count(SIZES["heads"])
    writer.add_head_count_kv(SIZES["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    for key, value in {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
                       "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}.items():  # fmt: skip
        add_metadata(writer, key, value)
    rng = np.random.default_rng(0)
    for name, weight in weights.items():
        gguf = gguf_name(name)
        if weight.dim() == 1:
            writer.add_tensor(gguf, weight.numpy())
            continue
        qtype = MIXED[gguf.split(".")[-2]]
        writer.add_tensor(gguf, random_blocks(qtype, *weight.shape, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory) -> Path:
    return write_mixed_gguf(tmp_path_factory.mktemp("mixed") / "mixed.gguf")


def test_a_mixed_k_quant_file_stays_in_its_blocks(mixed_gguf):
    model, exact = attendo.load(mixed_gguf), attendo.load(mixed_gguf, dtype="float32")
    qkv = model.network.blocks[0].attn.qkv
    assert isinstance(qkv, StackedLinear)
    assert [(part.qtype, part.out_features) for part in qkv.parts] == [(Q.Q4_K, 256 + 128), (Q.Q6_K, 128)]  # q and k, then v
    # Every matrix is the file's blocks, which dequantize to what the float32 load holds.
    for name, layer in exact.network.named_modules():
        if isinstance(layer, torch.nn.Linear):
            ours = model.network.get_submodule(name)
            parts = ours.parts if isinstance(ours, StackedLinear) else [ours]
            assert all(isinstance(p, BlockLinear) for p in parts), name
            assert torch.equal(torch.cat([p.dequantized() for p in parts]), layer.weight), name
    # ...and take the file's bytes for them: the same bytes, packed 16 rows together, where a
    # matrix whose rows are no multiple of 16 (the 282-token vocabulary) gets zero rows up to one.
    _, infos = read_header(mixed_gguf)
    file_bytes = sum(info.n_bytes for info in infos.values() if len(info.shape) == 2)
    layers = {id(m.blocks): m for m in model.network.modules() if isinstance(m, BlockLinear)}
    padding = sum((-m.out_features % 16) * m.row_bytes for m in layers.values() if m.packed)
    assert sum(m.blocks.nbytes for m in layers.values()) == file_bytes + padding
    assert padding < 0.01 * file_bytes


def test_a_mixed_k_quant_file_computes_the_reference_products(mixed_gguf):
    model = attendo.load(mixed_gguf)
    ids = [model.tokenizer.encode("hello world, the world")]
    with products_checked() as agreed:
        got = model.logits(ids)
    # per layer: q/k and v, out, gate and up, down (v and up differ in format from their neighbours)
    assert len(agreed) == 2 * 6 + 1 and all(agreed)
    with reference_products():
        expected = model.logits(ids)
    assert (got - expected).norm() / expected.norm() < 0.02
    assert len(model.generate("hello", max_new_tokens=5, do_sample=False).token_ids) == 5


def test_a_k_quant_tensor_whose_size_does_not_match_its_shape_is_refused(mixed_gguf, tmp_path):
    broken = tmp_path / "rows.gguf"
    broken.write_bytes(mixed_gguf.read_bytes())
    dims = tensor_info_at(broken, "blk.0.attn_q.weight") - 16  # ne[0] and ne[1] come before the type
    patch(broken, dims + 8, struct.pack("<Q", 4096))  # claims 4096 rows; the data holds 128
    with pytest.raises(CheckpointError, match=r"'blk.0.attn_q.weight'.*Q4_K.*size does not match its shape") as raised:
        read_header(broken)
    assert "\n" not in str(raised.value)
    assert main(["generate", "hi", "--model", str(broken)]) == 2

    partial = tmp_path / "width.gguf"
    partial.write_bytes(mixed_gguf.read_bytes())
    patch(partial, dims, struct.pack("<Q", 200))  # rows of 200 values: no whole 256-value block
    with pytest.raises(CheckpointError, match=r"'blk.0.attn_q.weight'.*200.*Q4_K blocks"):
        read_header(partial)
