"""The speed-up passes (attendo.optimize) and the block kernel (attendo.kernels) change how fast a
model runs, not what it says. Quantized models are checked against quantized_reference (the
kernel's rounding in plain torch), and the rounding of weights against gguf's own quantizer."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

import attendo
from attendo import fused, kernels, optimize
from attendo.inspect.summary import describe
from attendo.optimize import BlockEmbedding, BlockLinear, HalfLinear, half_weights, quantize_weights
from attendo.weights import ggml_blocks
from quantized_reference import products_checked, reference_forward, reference_products

PROMPTS = ["Hello world!", "def add(a, b):", "The capital of France is Paris. The"]
FORMATS = [Q.Q8_0, Q.Q4_0, Q.Q4_1]
needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile needs a C++ compiler"
)
needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"no block kernel: {kernels.unavailable_reason()}")


def _rounded_to_half(model: attendo.Model) -> attendo.Model:
    """The same model with every linear weight rounded to float16 and kept as float32: the
    reference for half_weights, so that only the storage format differs."""
    with torch.no_grad():
        for module in model.network.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(module.weight.half().float())
    return model


@pytest.mark.parametrize("qtype", FORMATS)
def test_encoding_matches_gguf_quantizer_and_round_trips(qtype):
    torch.manual_seed(0)
    weight = torch.randn(37, 96) * torch.rand(37, 1)  # rows of different ranges
    weight[5] = 0.0  # an all-zero block must not divide by zero
    blocks = ggml_blocks.encode(weight, qtype)
    assert blocks.dtype == torch.uint8 and blocks.shape[0] == 37
    assert np.array_equal(blocks.numpy().reshape(-1), quantize(weight.numpy(), qtype).reshape(-1))
    decoded = ggml_blocks.decode(blocks.reshape(-1), qtype, weight.shape)
    assert torch.equal(decoded, torch.from_numpy(dequantize(blocks.numpy(), qtype).reshape(37, 96)))
    assert torch.equal(decoded[5], weight[5])
    layer = BlockLinear(blocks, qtype, 96)
    assert torch.equal(layer.dequantized(), decoded)  # the kernel's dequantization, where it exists
    index = torch.tensor([[3, 0], [36, 3]])
    assert torch.equal(layer.rows(index), decoded[index])


@needs_kernel
@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 5, 8, 64, 65])
def test_block_product_equals_its_reference(qtype, rows):
    torch.manual_seed(rows)
    weight, bias = torch.randn(70, 96), torch.randn(70)
    layer = BlockLinear.quantize(weight, bias, qtype)
    x = torch.randn(rows, 1, 96) * 3
    expected = reference_forward(layer, x)
    assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-4)
    # the product stays close to the float one (the rounding's error, not a wrong sum)
    error = (layer(x) - F.linear(x, weight, bias)).norm() / F.linear(x, weight, bias).norm()
    assert error < (0.02 if qtype == Q.Q8_0 else 0.2)


@needs_kernel
@needs_compiler
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1])
def test_compiled_block_product_calls_the_kernel(qtype):
    torch.manual_seed(1)
    layer = BlockLinear.quantize(torch.randn(48, 64), torch.randn(48), qtype)
    x = torch.randn(3, 1, 64)
    got = torch.compile(layer, dynamic=False, fullgraph=True)(x)
    assert torch.allclose(got, reference_forward(layer, x), rtol=1e-5, atol=1e-4)


def test_a_broken_cached_library_is_reported_not_loaded(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    broken = kernels._library_path(kernels._compiler())
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a shared library")  # a damaged cache file
    kernels.library.cache_clear()
    try:
        assert not kernels.available()
        assert str(broken) in kernels.unavailable_reason()
    finally:
        kernels.library.cache_clear()


def test_without_a_compiler_the_kernel_is_unavailable_and_layers_fall_back(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    kernels.library.cache_clear()
    try:
        assert not kernels.available()
        assert "no-such-cc" in kernels.unavailable_reason()
        layer = BlockLinear.quantize(torch.randn(16, 32), None, Q.Q4_1)
        x = torch.randn(2, 32)
        assert not layer.use_kernel
        assert torch.allclose(layer(x), x @ layer.dequantized().T, atol=1e-5)
    finally:
        kernels.library.cache_clear()


def test_half_weights_stores_16_bits_and_matches_rounded_float32(tiny_llama_dir):
    reference = _rounded_to_half(attendo.load(tiny_llama_dir))
    model = attendo.load(tiny_llama_dir)
    half_weights(model.network)
    layers = [m for m in model.network.modules() if isinstance(m, HalfLinear)]
    assert layers and all(m.weight.dtype == torch.float16 for m in layers)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.network.modules())
    ids = [model.tokenizer.encode(PROMPTS[2])]
    assert torch.allclose(model.logits(ids), reference.logits(ids), atol=1e-5)


@pytest.mark.parametrize("weights", ["int8", "int4", "q4_0"])
@pytest.mark.parametrize("kind, tied", [("llama-gqa", False), ("llama-tied", True)])
def test_quantized_weights_take_their_bytes_and_match_the_reference(tiny_model, kind, tied, weights):
    directory = tiny_model(kind)[0]
    qtype = optimize.QUANTIZED_FORMATS[weights]
    model = attendo.load(directory)
    matrices = {id(m.weight): m.weight for m in model.network.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    values = sum(w.numel() for w in matrices.values())  # tied weights count once
    quantize_weights(model.network, qtype)
    network = model.network
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) for m in network.modules())
    assert isinstance(network.embed, BlockEmbedding) and (network.embed.table is network.lm_head) == tied
    blocks = {id(m.blocks): m.blocks for m in network.modules() if isinstance(m, BlockLinear)}
    bytes_per_block = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}[qtype]
    assert sum(b.nbytes for b in blocks.values()) == values // 32 * bytes_per_block
    ids = [model.tokenizer.encode(PROMPTS[2])]
    with products_checked() as agreed:
        got = model.logits(ids)
    assert len(agreed) == len(network.blocks) * 4 + 1 and all(agreed)
    with reference_products():
        expected = model.logits(ids)
    assert (got - expected).norm() / expected.norm() < 0.02


def _quantized(weights: str) -> Callable[[attendo.Model], attendo.Model]:
    return lambda model: model.speed_up(weights, compile=False)


@needs_compiler
def test_compiled_decode_gives_the_same_tokens(tiny_llama_dir):
    """A network the fused blocks cannot run (float16 activations) gets a compiled decode step;
    compiling changes how the step runs, not a token: the reference is the same model, eager."""
    reference = attendo.load(tiny_llama_dir, dtype="float16")
    model = attendo.load(tiny_llama_dir, dtype="float16").speed_up("float32")
    assert model.decode_step is not None
    # Three prompts decode as a batch of four rows (rounded up to a power of two).
    expected = reference.generate(PROMPTS, max_new_tokens=12, do_sample=False)
    got = model.generate(PROMPTS, max_new_tokens=12, do_sample=False)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    # A second call reuses the compiled step and a seeded sample is reproducible.
    sampled = [model.generate(PROMPTS[0], max_new_tokens=8, temperature=0.9, seed=7).token_ids for _ in range(2)]
    assert sampled[0] == sampled[1] == reference.generate(PROMPTS[0], max_new_tokens=8, temperature=0.9, seed=7).token_ids


@needs_kernel
@pytest.mark.parametrize("weights, reference", [("float16", _rounded_to_half), ("int8", _quantized("int8"))])
def test_the_fast_path_of_a_fusable_network_needs_no_compiling(tiny_llama_dir, weights, reference):
    reference = reference(attendo.load(tiny_llama_dir))
    model = attendo.load(tiny_llama_dir).speed_up(weights)
    assert model.decode_step is None and fused.unfusable(model.network) is None
    got = model.generate(PROMPTS, max_new_tokens=12, do_sample=False)
    assert [r.token_ids for r in got] == [r.token_ids for r in reference.generate(PROMPTS, max_new_tokens=12, do_sample=False)]


def test_unknown_weight_format_is_refused(tiny_llama_dir):
    with pytest.raises(attendo.errors.InvalidSettingError, match="int3"):
        attendo.load(tiny_llama_dir).speed_up("int3", compile=False)


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("kind", ["llama-gqa", "llama-tied"])
def test_loading_quantized_equals_quantizing_after_loading(tiny_model, kind, weights):
    directory = tiny_model(kind)[0]
    loaded = attendo.load(directory, dtype=weights)
    converted = attendo.load(directory)
    quantize_weights(converted.network, optimize.QUANTIZED_FORMATS[weights])
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) for m in loaded.network.modules())
    ids = [loaded.tokenizer.encode(PROMPTS[1])]
    assert torch.equal(loaded.logits(ids), converted.logits(ids))
    assert describe(loaded)["parameters"] == describe(converted)["parameters"]
    assert f"tensors {optimize.QUANTIZED_FORMATS[weights].name.lower()}" in describe(loaded)["weights in memory"]


# --- the fused blocks (attendo.fused) ---------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("kind", ["llama-gqa", "qwen2", "gpt2", "llama-tied"])
def test_fused_blocks_compute_what_the_modules_compute(tiny_model, kind):
    model = attendo.load(tiny_model(kind)[0])
    assert fused.unfusable(model.network) is None
    ids = [model.tokenizer.encode(p) for p in PROMPTS[1:]]
    ids = [row[: min(map(len, ids))] for row in ids]
    got = model.logits(ids)
    with fused.disabled():
        expected = model.logits(ids)
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()
    # and decoding step by step through a KV cache gives the tokens the modules give
    with fused.disabled():
        reference = model.generate(PROMPTS, max_new_tokens=8, do_sample=False)
    assert [r.token_ids for r in model.generate(PROMPTS, max_new_tokens=8, do_sample=False)] == [r.token_ids for r in reference]


@needs_kernel
def test_fused_alibi_blocks_compute_what_the_modules_compute():
    model = attendo.build("bloom-560m", n_layers=2, dim=64, n_heads=4, ffn_dim=128, vocab_size=300)
    assert fused.unfusable(model.network) is None
    ids = torch.randint(0, 300, (2, 11))
    got = model.logits(ids)
    with fused.disabled():
        expected = model.logits(ids)
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()


class _Adapter(torch.nn.Module):
    """A stand-in for what a fine-tuning library wraps a projection in: base(x) + a small change."""

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.base, self.in_features, self.out_features = base, base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + 0.5


@needs_kernel
def test_replaced_modules_are_planned_again_or_run_as_modules(tiny_llama_dir):
    model = attendo.load(tiny_llama_dir)
    ids = [model.tokenizer.encode(PROMPTS[2])]
    quantize_weights(model.network, Q.Q8_0)  # after loading: the plan must read the new blocks
    quantized = model.logits(ids)
    with fused.disabled():
        assert (quantized - model.logits(ids)).abs().max() < 0.02 * quantized.abs().max()
    block = model.network.blocks[1]
    block.mlp.down = _Adapter(block.mlp.down)
    assert "_Adapter" in fused.unfusable(model.network)
    adapted = model.logits(ids)
    with fused.disabled():
        assert torch.equal(adapted, model.logits(ids))  # the modules ran, adapter included
    assert not torch.equal(adapted, quantized)


@needs_kernel
def test_attention_maps_and_gradients_take_the_modules_path(tiny_llama_dir):
    model = attendo.load(tiny_llama_dir)
    ids = [model.tokenizer.encode(PROMPTS[0])]
    maps = model.attention_maps(ids)
    assert maps.shape[:2] == (model.config.n_layers, 1)
    model.network.blocks[0].attn.out.weight.requires_grad_(True)
    loss = model.network(torch.tensor(ids)).sum()
    loss.backward()
    assert model.network.blocks[0].attn.out.weight.grad is not None
