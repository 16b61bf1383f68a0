"""The speed-up passes (attendo.optimize) change how fast a model runs, not what it says."""

from __future__ import annotations

import shutil

import pytest
import torch

import attendo
from attendo.inspect.summary import describe
from attendo.optimize import HalfLinear, Int8Embedding, Int8Linear, half_weights, int8_weights

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


def _rounded_to_int8(model: attendo.Model) -> attendo.Model:
    """The same model with every linear weight and the embedding rounded to the int8 grid of
    Int8Linear (one scale per row) and kept as float32: the reference for int8_weights."""
    with torch.no_grad():
        for module in model.network.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(Int8Linear(module.weight, None).dequantized())
    return model


def test_int8_rows_round_trip_within_half_a_step():
    torch.manual_seed(0)
    weight = torch.randn(37, 24) * torch.rand(37, 1)  # rows of different ranges
    weight[5] = 0  # an all-zero row must not divide by zero
    layer = Int8Linear(weight, None)
    assert layer.words.numel() * 4 == weight.numel()  # one byte per weight
    step = weight.abs().amax(1, keepdim=True) / 127
    assert ((layer.dequantized() - weight).abs() <= step / 2 + 1e-7).all()
    assert torch.equal(layer.dequantized()[5], torch.zeros(24))
    index = torch.tensor([[3, 0], [36, 3]])
    assert torch.equal(layer.rows(index), layer.dequantized()[index])


@needs_compiler
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_int8_compiled_product_equals_the_matrix_multiply(rows):
    torch.manual_seed(rows)
    layer = Int8Linear(torch.randn(48, 32), torch.randn(48))
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


@pytest.mark.parametrize("kind, tied", [("llama-gqa", False), ("llama-tied", True)])
def test_int8_weights_keep_one_byte_per_weight_and_match_rounded_float32(tiny_model, kind, tied):
    directory = tiny_model(kind)[0]
    reference = _rounded_to_int8(attendo.load(directory))
    model = attendo.load(directory)
    float_bytes = sum(p.nbytes for p in model.network.parameters())
    int8_weights(model.network)
    network = model.network
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) for m in network.modules())
    assert isinstance(network.embed, Int8Embedding) and (network.embed.table is network.lm_head) == tied
    stored = sum(t.nbytes for t in [*network.parameters(), *network.buffers()] if t.dim() > 0)
    rope_tables = network.rope_cos.nbytes + network.rope_sin.nbytes
    assert stored - rope_tables < 0.3 * float_bytes
    ids = [model.tokenizer.encode(PROMPTS[2])]
    assert torch.allclose(model.logits(ids), reference.logits(ids), atol=1e-4)


@needs_compiler
@pytest.mark.parametrize("weights, rounded", [("float16", _rounded_to_half), ("int8", _rounded_to_int8)])
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
    with pytest.raises(attendo.errors.InvalidSettingError, match="int4"):
        attendo.load(tiny_llama_dir).speed_up("int4", compile=False)


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-tied"])
def test_loading_as_int8_equals_quantizing_after_loading(tiny_model, kind):
    directory = tiny_model(kind)[0]
    loaded = attendo.load(directory, dtype="int8")
    converted = attendo.load(directory)
    int8_weights(converted.network)
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) for m in loaded.network.modules())
    ids = [loaded.tokenizer.encode(PROMPTS[1])]
    assert torch.equal(loaded.logits(ids), converted.logits(ids))
    assert describe(loaded)["parameters"] == describe(converted)["parameters"]
    assert "tensors int8" in describe(loaded)["weights in memory"]
