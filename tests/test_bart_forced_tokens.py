"""BART's forced tokens: forced_bos_token_id (the first generated token) and forced_eos_token_id
(the last one the length limit allows), from generation_config.json or, in older checkpoints,
config.json; in greedy decoding, sampling and beam search, against transformers on a tiny BART."""

from __future__ import annotations

import json

import pytest
import torch

import attendo
from tiny_families import SENTENCES, jitter, save, word_tokenizer

transformers = pytest.importorskip("transformers")

BART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
EOS = 2


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    """(attendo model, transformers reference) of a tiny BART whose generation config forces
    "moon" first and </s> last."""
    tokenizer = word_tokenizer(BART_SPECIALS, "<s> $A </s>")
    config = transformers.BartConfig(
        vocab_size=tokenizer.get_vocab_size(), d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(3)
    reference = jitter(transformers.BartForConditionalGeneration(config), seed=1, scale=0.1)
    with torch.no_grad():  # a buffer, so jitter skipped it; this one keeps </s> from coming first
        reference.final_logits_bias.add_(torch.randn(reference.final_logits_bias.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    reference.generation_config.forced_bos_token_id = tokenizer.token_to_id("moon")
    reference.generation_config.forced_eos_token_id = EOS
    directory = save(reference, tokenizer, tmp_path_factory.mktemp("bart-forced"))
    return attendo.load(directory), reference


def expected(reference, model, text: str, **settings) -> list[int]:
    source = torch.tensor([model.tokenizer.encode(text)])
    return reference.generate(source, **settings)[0, 1:].tolist()  # without the decoder start token


def test_the_generation_config_is_read(bart):
    model, reference = bart
    assert model.generation_defaults["forced_bos_token_id"] == model.tokenizer.token_to_id("moon")
    assert model.generation_defaults["forced_eos_token_id"] == EOS
    # Unforced, this model would neither start with "moon" nor end a length-limited answer with </s>.
    saved = dict(model.generation_defaults)
    try:
        for key in ("forced_bos_token_id", "forced_eos_token_id"):
            del model.generation_defaults[key]
        unforced = model.generate(SENTENCES[0], max_new_tokens=8, do_sample=False).token_ids
    finally:
        model.generation_defaults.update(saved)
    assert unforced[0] != saved["forced_bos_token_id"] and EOS not in unforced


@pytest.mark.parametrize("limit", [1, 2, 8])
def test_greedy_matches_transformers(bart, limit):
    model, reference = bart
    for text in SENTENCES[:3]:
        ours = model.generate(text, max_new_tokens=limit, do_sample=False)
        assert ours.token_ids == expected(reference, model, text, max_new_tokens=limit, do_sample=False), text
        assert ours.token_ids[-1] == EOS and ours.finish_reason == "stop"


@pytest.mark.parametrize("settings", [dict(num_beams=3), dict(num_beams=4, length_penalty=2.0, no_repeat_ngram_size=2)])
def test_beam_search_matches_transformers(bart, settings):
    model, reference = bart
    for text in SENTENCES[:3]:
        ours = model.generate(text, max_new_tokens=7, **settings).token_ids
        assert ours == expected(reference, model, text, max_new_tokens=7, do_sample=False, **settings), text


def test_sampling_writes_the_forced_tokens_where_transformers_does(bart):
    """Draws differ between the two random generators; the forced steps may not."""
    model, reference = bart
    first = model.generation_defaults["forced_bos_token_id"]
    torch.manual_seed(0)
    theirs = [expected(reference, model, SENTENCES[1], max_new_tokens=6, do_sample=True, temperature=1.5) for _ in range(4)]
    ours = [model.generate(SENTENCES[1], max_new_tokens=6, temperature=1.5, seed=s).token_ids for s in range(4)]
    for tokens in theirs + ours:
        assert tokens[0] == first
        assert len(tokens) < 6 or tokens[-1] == EOS  # a draw may end early with </s>
    assert len({tuple(t) for t in ours}) > 1  # really sampled


def test_config_json_supplies_them_when_generation_config_does_not(bart, tmp_path):
    model, _ = bart
    directory = tmp_path / "old-style"
    directory.mkdir()
    for file in model.source.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    generation = json.loads((directory / "generation_config.json").read_text())
    forced = {key: generation.pop(key) for key in ("forced_bos_token_id", "forced_eos_token_id")}
    (directory / "generation_config.json").write_text(json.dumps(generation))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | forced))
    old_style = attendo.load(directory)
    assert {k: old_style.generation_defaults[k] for k in forced} == forced
    assert old_style.generate(SENTENCES[2], max_new_tokens=5).token_ids == model.generate(SENTENCES[2], max_new_tokens=5).token_ids
