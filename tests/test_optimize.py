"""The speed-up passes (attendo.optimize) change how fast a model runs, not what it says."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import pytest
import torch

import attendo
from attendo.inspect.summary import describe
from attendo.optimize import HalfLinear, PackedEmbedding, PackedLinear, half_weights, quantize_weights

PROMPTS = ["Hello world!", "def add(a, b):", "The capital of France is Paris. The"]
needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile needs a C++ compiler"
)


def _rounded_to_half(model: attendo.Model) -> attendo.Model:
    """The same model with every linear weight rounded to float16 and kept as float32: the
    reference for half_weights, so that only the storage format differs."""
    with torch.no_grad():
        for module in model.network.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(module.weight.half().float())
    return model


def _rounded_to(bits: int) -> Callable[[attendo.Model], attendo.Model]:
    def rounded(model: attendo.Model) -> attendo.Model:
        """The same model with every linear weight and the embedding rounded to the grid of
        PackedLinear and kept as float32: the reference for quantize_weights."""
        with torch.no_grad():
            for module in model.network.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                    module.weight.copy_(PackedLinear(module.weight, None, bits).dequantized())
        return model

    return rounded


@pytest.mark.parametrize("bits", [8, 4])
def test_packed_rows_round_trip_within_half_a_step(bits):
    torch.manual_seed(0)
    weight = torch.randn(37, 24) * torch.rand(37, 1)  # rows of different ranges
    weight[5] = 0.25  # a constant group must not divide by zero
    layer = PackedLinear(weight, None, bits)
    assert layer.words.numel() * 32 == weight.numel() * bits
    groups = weight.view(37, 32 // bits, -1)
    step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / (2**bits - 1)
    error = (layer.dequantized().view_as(groups) - groups).abs()
    assert (error <= step / 2 + 1e-6).all()
    assert torch.equal(layer.dequantized()[5], weight[5])
    index = torch.tensor([[3, 0], [36, 3]])
    assert torch.equal(layer.rows(index), layer.dequantized()[index])


@needs_compiler
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_packed_compiled_product_equals_the_matrix_multiply(rows, bits):
    torch.manual_seed(rows)
    layer = PackedLinear(torch.randn(48, 32), torch.randn(48), bits)
    x = torch.randn(rows, 1, 32)
    expected = x @ layer.dequantized().T + layer.bias
    got = torch.compile(layer, dynamic=False)(x)
    assert got.shape == (rows, 1, 48)
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.allclose(layer(x), expected, atol=1e-4)


def test_half_weights_stores_16_bits_and_matches_rounded_float32(tiny_llama_dir):
    reference = _rounded_to_half(attendo.load(tiny_llama_dir))
    model = attendo.load(tiny_llama_dir)
    half_weights(model.network)
    layers = [m for m in model.network.modules() if isinstance(m, HalfLinear)]
    assert layers and all(m.weight.dtype == torch.float16 for m in layers)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.network.modules())
    ids = [model.tokenizer.encode(PROMPTS[2])]
    assert torch.allclose(model.logits(ids), reference.logits(ids), atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind, tied", [("llama-gqa", False), ("llama-tied", True)])
def test_quantized_weights_take_their_bits_and_match_rounded_float32(tiny_model, kind, tied, bits):
    directory = tiny_model(kind)[0]
    reference = _rounded_to(bits)(attendo.load(directory))
    model = attendo.load(directory)
    matrices = {id(m.weight): m.weight for m in model.network.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    float_bytes = sum(w.nbytes for w in matrices.values())  # tied weights count once
    quantize_weights(model.network, bits)
    network = model.network
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) for m in network.modules())
    assert isinstance(network.embed, PackedEmbedding) and (network.embed.table is network.lm_head) == tied
    packed = [m for m in network.modules() if isinstance(m, PackedLinear)]
    assert sum(m.words.nbytes for m in packed) * 32 == float_bytes * bits
    ids = [model.tokenizer.encode(PROMPTS[2])]
    assert torch.allclose(model.logits(ids), reference.logits(ids), atol=1e-4)


@needs_compiler
@pytest.mark.parametrize(
    "weights, rounded", [("float16", _rounded_to_half), ("int8", _rounded_to(8)), ("int4", _rounded_to(4))]
)
def test_compiled_decode_gives_the_same_tokens(tiny_llama_dir, weights, rounded):
    reference = rounded(attendo.load(tiny_llama_dir))
    model = attendo.load(tiny_llama_dir).speed_up(weights)
    assert model.decode_step is not None
    # Three prompts decode as a batch of four rows (rounded up to a power of two).
    expected = reference.generate(PROMPTS, max_new_tokens=12, do_sample=False)
    got = model.generate(PROMPTS, max_new_tokens=12, do_sample=False)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    # A second call reuses the compiled step and a seeded sample is reproducible.
    sampled = [model.generate(PROMPTS[0], max_new_tokens=8, temperature=0.9, seed=7).token_ids for _ in range(2)]
    assert sampled[0] == sampled[1] == reference.generate(PROMPTS[0], max_new_tokens=8, temperature=0.9, seed=7).token_ids


def test_unknown_weight_format_is_refused(tiny_llama_dir):
    with pytest.raises(attendo.errors.InvalidSettingError, match="int3"):
        attendo.load(tiny_llama_dir).speed_up("int3", compile=False)


@pytest.mark.parametrize("weights, bits", [("int8", 8), ("int4", 4)])
@pytest.mark.parametrize("kind", ["llama-gqa", "llama-tied"])
def test_loading_quantized_equals_quantizing_after_loading(tiny_model, kind, weights, bits):
    directory = tiny_model(kind)[0]
    loaded = attendo.load(directory, dtype=weights)
    converted = attendo.load(directory)
    quantize_weights(converted.network, bits)
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) for m in loaded.network.modules())
    ids = [loaded.tokenizer.encode(PROMPTS[1])]
    assert torch.equal(loaded.logits(ids), converted.logits(ids))
    assert describe(loaded)["parameters"] == describe(converted)["parameters"]
    assert f"tensors {weights}" in describe(loaded)["weights in memory"]
