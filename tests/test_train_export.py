"""Saving in the Hugging Face format is loading run backwards: for a tiny random checkpoint of
every family, attendo.load then train/export.py's hf_tensors gives back the checkpoint's own
tensors, name for name and bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import attendo
from attendo.train.checkpoint import full_weights
from attendo.train.export import hf_config, hf_tensors
from tiny_families import jitter, save, word_tokenizer

transformers = pytest.importorskip("transformers")


def _bloom(directory):
    config = transformers.BloomConfig(vocab_size=100, hidden_size=48, n_layer=2, n_head=6)
    return transformers.BloomForCausalLM(config)


def _bert(directory):
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    )
    return transformers.BertForMaskedLM(config)


def _t5(directory):
    config = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu"
    )
    return transformers.T5ForConditionalGeneration(config)


def _bart(directory):
    config = transformers.BartConfig(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(config)


FAMILIES = {"bloom": _bloom, "bert": _bert, "t5": _t5, "bart": _bart}


def _round_trip(directory, model_type):
    original = load_file(directory / "model.safetensors")
    model = attendo.load(directory, dtype="float32")
    exported = hf_tensors(full_weights(model.network), model.config, model_type, list(original))
    for name, tensor in exported.items():
        assert torch.equal(tensor, original[name]), name
    # Whatever was not written is a tied copy of a tensor that was (transformers may save both).
    for name in set(original) - set(exported):
        assert any(torch.equal(original[name], t) for t in exported.values()), name


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa", "qwen2", "llama-tied"])
def test_decoders_save_back_to_their_own_tensors(tiny_model, kind):
    directory, reference = tiny_model(kind)
    _round_trip(directory, reference.config.model_type)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_saves_back_to_its_own_tensors(tmp_path, family):
    torch.manual_seed(0)
    reference = jitter(FAMILIES[family](tmp_path), seed=1)
    if family == "bart":
        with torch.no_grad():  # a buffer, so jitter skipped it
            reference.final_logits_bias.add_(torch.randn(reference.final_logits_bias.shape))
    directory = save(reference, word_tokenizer(["<pad>", "<unk>", "<s>", "</s>"]), tmp_path / family)
    _round_trip(directory, reference.config.model_type)


def test_a_preset_config_reads_back_as_itself():
    config = attendo.PRESETS["llama-mini"]
    assert hf_config(config)["model_type"] == "llama"
    assert hf_config(attendo.PRESETS["gpt2-mini"])["model_type"] == "gpt2"
    with pytest.raises(attendo.UnsupportedModelError, match="no Hugging Face model type"):
        hf_config(config.replace(qkv_bias=True, out_bias=False, norm="layernorm"))
