"""The speed-up passes (attendo.optimize) change how fast a model runs, not what it says."""

from __future__ import annotations

import shutil

import pytest
import torch

import attendo
from attendo.optimize import HalfLinear, half_weights

PROMPTS = ["Hello world!", "def add(a, b):", "The capital of France is Paris. The"]


def _rounded_to_half(model: attendo.Model) -> attendo.Model:
    """The same model with every linear weight rounded to float16 and kept as float32: the
    reference for half_weights, so that only the storage format differs."""
    with torch.no_grad():
        for module in model.network.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(module.weight.half().float())
    return model


def test_half_weights_stores_16_bits_and_matches_rounded_float32(tiny_llama_dir):
    reference = _rounded_to_half(attendo.load(tiny_llama_dir))
    model = attendo.load(tiny_llama_dir)
    half_weights(model.network)
    layers = [m for m in model.network.modules() if isinstance(m, HalfLinear)]
    assert layers and all(m.weight.dtype == torch.float16 for m in layers)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.network.modules())
    ids = [model.tokenizer.encode(PROMPTS[2])]
    assert torch.allclose(model.logits(ids), reference.logits(ids), atol=1e-5)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile needs a C++ compiler")
def test_compiled_decode_gives_the_same_tokens(tiny_llama_dir):
    reference = _rounded_to_half(attendo.load(tiny_llama_dir))
    model = attendo.load(tiny_llama_dir).speed_up()
    assert model.decode_step is not None
    expected = reference.generate(PROMPTS, max_new_tokens=12, do_sample=False)
    got = model.generate(PROMPTS, max_new_tokens=12, do_sample=False)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    # A second call reuses the compiled step and a seeded sample is reproducible.
    sampled = [model.generate(PROMPTS[0], max_new_tokens=8, temperature=0.9, seed=7).token_ids for _ in range(2)]
    assert sampled[0] == sampled[1] == reference.generate(PROMPTS[0], max_new_tokens=8, temperature=0.9, seed=7).token_ids
