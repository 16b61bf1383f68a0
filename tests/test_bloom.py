"""BLOOM against transformers on a tiny random checkpoint loaded through attendo.load: ALiBi biases
instead of position embeddings, a LayerNorm on the word embeddings, and the fused per-head
query_key_value matrix reordered by the name map."""

from __future__ import annotations

import pytest
import torch

import attendo
from attendo.layers.positions import alibi_slopes
from tiny_families import SENTENCES, jitter, max_diff, save, word_tokenizer

transformers = pytest.importorskip("transformers")

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
HEADS = 6  # not a power of two: the ALiBi slopes take their second, interleaved series too


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tokenizer = word_tokenizer(SPECIALS)
    config = transformers.BloomConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=48, n_layer=2, n_head=HEADS,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = jitter(transformers.BloomForCausalLM(config), seed=7)
    directory = save(reference, tokenizer, tmp_path_factory.mktemp("bloom"))
    reference.set_attn_implementation("eager")
    return attendo.load(directory), reference


def _ids(model, text=SENTENCES[0]) -> torch.Tensor:
    return torch.tensor([model.tokenizer.encode(text)])


def test_config_is_alibi_with_embedding_norm(pair):
    model, reference = pair
    c = model.config
    assert (c.family, c.positions, c.embedding_norm, c.norm, c.tie_embeddings) == ("decoder", "alibi", True, "layernorm", True)
    assert sum(p.numel() for p in model.network.parameters()) == sum(p.numel() for p in reference.parameters())


def test_alibi_slopes_match_transformers():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for heads in (4, 6, 12, 16):
        # transformers' alibi for keys 0 and 1 is slope * key position: the row for key 1 is the slopes.
        reference = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)[:, 0, 1]
        assert max_diff(alibi_slopes(heads), reference) < 1e-7


def test_logits_match_transformers(pair):
    model, reference = pair
    ids = _ids(model, SENTENCES[4])
    with torch.no_grad():
        expected = reference(ids).logits
    assert max_diff(model.logits(ids), expected) < 1e-4


def test_attention_weights_match_transformers(pair):
    """transformers adds slope * key position, attendo -slope * (query - key): the two differ by a
    constant per query row, which softmax removes, so the weights are equal."""
    model, reference = pair
    ids = _ids(model, SENTENCES[1])
    with torch.no_grad():
        expected = reference(ids, output_attentions=True).attentions
    maps = model.attention_maps(ids)
    assert maps.shape == (2, 1, HEADS, ids.shape[1], ids.shape[1])
    assert max_diff(maps, torch.stack(expected)) < 1e-5


def test_cached_decoding_equals_uncached(pair):
    model, _ = pair
    network = model.network
    ids = _ids(model, SENTENCES[2])
    with torch.no_grad():
        full = network(ids)
        cache = network.new_cache(1, ids.shape[1])
        prefill = network(ids[:, :3], cache=cache)
        steps = [network(ids[:, i : i + 1], torch.tensor([[i]]), cache=cache) for i in range(3, ids.shape[1])]
    assert max_diff(torch.cat([prefill, *steps], dim=1), full) < 1e-5


def test_greedy_generation_matches_transformers(pair):
    model, reference = pair
    for text in SENTENCES[:3]:
        ids = _ids(model, text)
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
        result = model.generate(text, max_new_tokens=10)
        assert result.token_ids == expected[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize(
    "settings",
    [dict(num_beams=3), dict(num_beams=2, length_penalty=0.5, early_stopping=True, no_repeat_ngram_size=2)],
)
def test_beam_search_matches_transformers(pair, settings):
    """Beam search also serves decoder-only models; the third greedy token is made the end token
    so that hypotheses finish before the limit."""
    model, reference = pair
    text = SENTENCES[3]
    ids = _ids(model, text)
    eos = model.generate(text, max_new_tokens=3).token_ids[2]
    saved = model.generation_defaults["eos_token_ids"]
    model.generation_defaults["eos_token_ids"] = [eos]
    try:
        result = model.generate(text, max_new_tokens=8, **settings)
    finally:
        model.generation_defaults["eos_token_ids"] = saved
    expected = reference.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, eos_token_id=eos, **settings
    )[0, ids.shape[1] :].tolist()
    assert result.token_ids == expected
