"""Decoder-only parity with transformers on tiny random models, loaded through attendo.load:
logits, greedy tokens and text, cached == uncached decoding, and the two attention paths."""

from __future__ import annotations

import pytest
import torch

import attendo
from attendo.layers.positions import rope_cos_sin
from attendo.models import decoder
from conftest import TINY_CONFIGS

PROMPT = "Hello world! def add(a, b):"


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def pair(request, tiny_model):
    """(attendo model, transformers reference) for each tiny architecture."""
    directory, reference = tiny_model(request.param)
    return attendo.load(directory), reference


def random_ids(vocab_size: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_match_reference(pair):
    model, reference = pair
    ids = random_ids(model.config.vocab_size, batch=3, length=17)
    ours = model.logits(ids)
    with torch.no_grad():
        theirs = reference(ids, attention_mask=torch.ones_like(ids)).logits
    assert ours.shape == theirs.shape == (3, 17, model.config.vocab_size)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_greedy_tokens_and_text_match_reference(pair, hf_tokenizer):
    model, reference = pair
    result = model.generate(PROMPT, max_new_tokens=20, do_sample=False)
    ids = torch.tensor([result.prompt_token_ids])
    unused = next(i for i in reversed(range(model.config.vocab_size)) if i not in result.prompt_token_ids)
    with torch.no_grad():  # an explicit mask: transformers would otherwise infer padding from pad ids
        out = reference.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, pad_token_id=unused
        )
    expected = out[0, ids.shape[1] :].tolist()
    assert result.prompt_token_ids == hf_tokenizer.encode(PROMPT)
    assert result.token_ids == expected
    assert result.text == hf_tokenizer.decode(expected, skip_special_tokens=True)
    assert result.finish_reason == "length"


def test_cached_decoding_equals_full_forward(pair):
    model, _ = pair
    network = model.network
    ids = random_ids(model.config.vocab_size, batch=1, length=12, seed=1)
    with torch.no_grad():
        full = network(ids)
        cache = network.new_cache(slots=1, max_len=12)
        prefill = network(ids[:, :5], torch.arange(5)[None], cache=cache)
        torch.testing.assert_close(prefill, full[:, :5], rtol=0, atol=1e-5)
        for p in range(5, 12):
            step = network(ids[:, p : p + 1], torch.tensor([[p]]), cache=cache)
            torch.testing.assert_close(step[:, 0], full[:, p], rtol=0, atol=1e-5)


def test_sequences_of_different_lengths_share_one_cache(pair):
    """Two sequences at different positions decode together; each matches its own full forward,
    so the stale cache positions of the shorter one are never attended to."""
    model, _ = pair
    network = model.network
    long, short = random_ids(model.config.vocab_size, 1, 11, seed=2), random_ids(model.config.vocab_size, 1, 7, seed=3)
    with torch.no_grad():
        full_long, full_short = network(long), network(short)
        cache = network.new_cache(slots=2, max_len=11)
        network(long[:, :7], torch.arange(7)[None], cache=cache, slots=torch.tensor([0]))
        network(short[:, :3], torch.arange(3)[None], cache=cache, slots=torch.tensor([1]))
        for step in range(4):
            p, q = 7 + step, 3 + step
            tokens = torch.tensor([[long[0, p]], [short[0, q]]])
            logits = network(tokens, torch.tensor([[p], [q]]), cache=cache)
            torch.testing.assert_close(logits[0, 0], full_long[0, p], rtol=0, atol=1e-5)
            torch.testing.assert_close(logits[1, 0], full_short[0, q], rtol=0, atol=1e-5)


def test_explicit_attention_path_equals_fused_path(pair):
    model, _ = pair
    ids = random_ids(model.config.vocab_size, batch=2, length=9, seed=4)
    with torch.no_grad():
        fused = model.network(ids)
        record: list[torch.Tensor] = []
        explicit = model.network(ids, record=record)
    assert len(record) == model.config.n_layers
    torch.testing.assert_close(explicit, fused, rtol=0, atol=1e-5)


def test_attention_maps_match_reference(pair):
    model, reference = pair  # the reference runs eager attention, which returns its weights
    ids = random_ids(model.config.vocab_size, batch=2, length=9, seed=5)
    maps = model.attention_maps(ids)
    with torch.no_grad():
        theirs = reference(ids, attention_mask=torch.ones_like(ids), output_attentions=True).attentions
    assert maps.shape == (model.config.n_layers, 2, model.config.n_heads, 9, 9)
    torch.testing.assert_close(maps, torch.stack(theirs), rtol=0, atol=1e-5)


def test_pass_from_the_start_equals_the_same_pass_at_given_positions(pair, monkeypatch):
    """Without positions the network takes the causal kernel and the RoPE table; with them, the
    written-out mask and rotations computed per position. Both agree, also past the table's end."""
    network = pair[0].network
    monkeypatch.setattr(decoder, "ROPE_TABLE_POSITIONS", 5)
    network.reset_tables()
    try:
        for length in (4, 9):  # within the table, and beyond it
            ids = random_ids(network.config.vocab_size, batch=2, length=length, seed=6)
            with torch.no_grad():
                from_start = network(ids)
                given = network(ids, torch.arange(length).expand(2, length))
            torch.testing.assert_close(from_start, given, rtol=0, atol=1e-5)
    finally:
        monkeypatch.undo()
        network.reset_tables()


def test_rotations_at_given_positions_are_the_computed_ones_bit_for_bit(pair, monkeypatch):
    """A decode step's positions are rows of the RoPE table when they lie inside it: the rows are
    gathered instead of computed, and must equal rope_cos_sin's values exactly (batch invariance
    and cached decoding rely on it); positions past the table are computed."""
    network = pair[0].network
    if network.config.positions != "rope":
        pytest.skip("no RoPE")
    monkeypatch.setattr(decoder, "ROPE_TABLE_POSITIONS", 40)
    network.reset_tables()
    try:
        frequencies, factor = network.rope_frequencies, network.config.rope_attention_factor
        for positions in (torch.tensor([[0], [17], [39], [3]]), torch.tensor([[5, 6, 7]]), torch.tensor([[38], [39], [40], [91]])):
            cos, sin = network._rotations(positions, False, network.rope_table, frequencies, factor)
            expected_cos, expected_sin = rope_cos_sin(positions, frequencies, factor)
            assert cos.shape == expected_cos.shape == (positions.shape[0], 1, positions.shape[1], network.config.rope_dims)
            assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)
    finally:
        monkeypatch.undo()
        network.reset_tables()
