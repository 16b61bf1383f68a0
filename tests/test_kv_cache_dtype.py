"""A 16-bit KV cache (attendo.load's kv_cache_dtype, the CLI's --kv-cache-dtype).

The reference is the float32 cache: a key or value written to a float16 or bfloat16 cache must be
the float32 one rounded as torch rounds it (the first layer's, which see the same inputs either
way), in the fused C blocks (this machine's build, the AVX2-only one and plain C) and in the
modules' path; the logits stay close to the float32 cache's; and a sequence still gets the same
bits alone, batched, joining a batch and prefilled in chunks.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_batch_invariance import assert_same_bits

import attendo
from attendo import fused, kernels
from attendo.cli import main
from attendo.errors import InvalidSettingError

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"no kernels: {kernels.unavailable_reason()}")
PROMPT = "The capital of France is Paris. The quick brown fox"
# Largest logit difference from the float32 cache, relative to the largest logit: a rounding of
# keys and values to 11 (float16) or 8 (bfloat16) significant bits.
TOLERANCE = {"float16": 1e-3, "bfloat16": 1e-2}


def prefill(model: attendo.Model, ids: list[int]) -> tuple[torch.Tensor, attendo.layers.kv_cache.KVCache]:
    with torch.inference_mode():
        cache = model.network.new_cache(1, 64)
        logits = model.network(torch.tensor([ids]), torch.arange(len(ids))[None], cache=cache)
    return logits[0], cache


@needs_kernels
@pytest.mark.parametrize("path", ["fused", "modules", "fused, AVX2 build", "fused, plain C build"])
@pytest.mark.parametrize("cache_dtype", ["float16", "bfloat16"])
def test_the_cache_holds_the_float32_keys_rounded_and_logits_stay_close(tiny_llama_dir, cache_dtype, path, monkeypatch):
    flags = {"fused, AVX2 build": kernels.AVX2_ONLY, "fused, plain C build": kernels.PORTABLE}.get(path)
    if flags is not None:
        library = kernels.library(flags)
        assert not isinstance(library, str), library
        monkeypatch.setattr(kernels, "library", lambda *_: library)
    # float32 weights: int8-rounded activations (the block formats') would magnify the difference
    reference = attendo.load(tiny_llama_dir, dtype="float32")
    model = attendo.load(tiny_llama_dir, dtype="float32", kv_cache_dtype=cache_dtype)
    assert fused.unfusable(model.network) is None
    ids = model.tokenizer.encode(PROMPT)
    with fused.disabled() if path == "modules" else contextlib.nullcontext():
        expected, float_cache = prefill(reference, ids)
        got, cache = prefill(model, ids)
    dtype = getattr(torch, cache_dtype)
    assert cache.keys[0].dtype == dtype and float_cache.keys[0].dtype == torch.float32
    n = len(ids)
    for stored, exact in [(cache.keys[0], float_cache.keys[0]), (cache.values[0], float_cache.values[0])]:
        assert torch.equal(stored[:, :, :n], exact[:, :, :n].to(dtype))
    assert not torch.equal(got, expected)  # later layers read the rounded keys
    assert (got - expected).abs().max() <= TOLERANCE[cache_dtype] * expected.abs().max()


@needs_kernels
@pytest.mark.parametrize("path", ["fused", "modules"])
def test_a_sequence_gets_the_same_bits_alone_and_batched_with_a_float16_cache(tiny_llama_dir, path):
    model = attendo.load(tiny_llama_dir, dtype="q4_1", kv_cache_dtype="float16")
    with fused.disabled() if path == "modules" else contextlib.nullcontext():
        assert_same_bits(model)


def test_an_unknown_cache_dtype_is_a_one_line_error(tiny_llama_dir, capsys):
    with pytest.raises(InvalidSettingError, match="kv_cache_dtype 'int3' is not supported"):
        attendo.load(tiny_llama_dir, kv_cache_dtype="int3")
    for command in (["generate", "--model", str(tiny_llama_dir), "--kv-cache-dtype", "int3", "hi"], ["serve", "--kv-cache-dtype", "fp8"]):
        assert main(command) == 2
        error = capsys.readouterr().err.strip()
        assert "is not supported" in error and len(error.splitlines()) == 1
