"""attendo.inspect against independent computations and the references: readable tokens for
three kinds of tokenizer and the bundled model, the sampling stages (what the sampler draws from,
the same token as model.generate with the same seed, the invariants of every stage against math
done here), one layer's attention equal to every layer's maps and to transformers for all three
families, PCA against numpy's SVD, and the data path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from test_seq2seq import _bart
from tiny_families import SENTENCES, max_diff, wordpiece_tokenizer

import attendo
from attendo.errors import InvalidSettingError, UnsupportedModelError
from attendo.generation.sampler import SamplingSettings, make_generator, next_token, process_logits
from attendo.inspect.attention import TooManyTokensError, attention_inputs, layer_attention
from attendo.inspect.datapath import data_path
from attendo.inspect.geometry import geometry, pca
from attendo.inspect.stages import stages_report
from attendo.inspect.tokens import bytes_text, readable_tokens, token_bytes
from attendo.tokenizer import TextTokenizer

transformers = pytest.importorskip("transformers")
EMOJI = "😀"  # four UTF-8 bytes: F0 9F 98 80


# --- readable tokens --------------------------------------------------------------------------


def test_bytes_that_are_not_a_whole_character_show_as_hex():
    assert bytes_text(" café".encode()) == " café"
    assert bytes_text(EMOJI.encode()[:3]) == "<0xF0><0x9F><0x98>"
    assert bytes_text(b" \x80ok") == " <0x80>ok"


def test_byte_level_tokens_of_an_emoji(tiny_llama):
    ids = tiny_llama.tokenizer.encode(f"Hi {EMOJI} there", add_special_tokens=False)
    tokens = readable_tokens(tiny_llama.tokenizer, ids)
    assert all("\ufffd" not in t for t in tokens)
    assert "".join(tokens) == "Hi <0xF0><0x9F><0x98><0x80> there"  # the leading spaces are kept
    assert readable_tokens(tiny_llama.tokenizer, tiny_llama.tokenizer.encode("<|im_end|>")) == ["<|im_end|>"]
    assert b"".join(token_bytes(tiny_llama.tokenizer, ids)) == f"Hi {EMOJI} there".encode()


def test_sentencepiece_style_tokens_keep_their_space_and_byte_pieces():
    """A LLaMA-style BPE with "▁" for spaces and <0x..> byte fallback, its decoder stripping the
    text's first space (decoding one token alone would lose it)."""
    byte_pieces = {f"<0x{b:02X}>": 3 + b for b in range(256)}
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **byte_pieces, "▁": 259, "H": 260, "i": 261, "Hi": 262, "▁Hi": 263}
    backend = Tokenizer(models.BPE(vocab, [("H", "i"), ("▁", "Hi")], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer = TextTokenizer(backend)
    ids = tokenizer.encode(f"Hi {EMOJI}")
    assert tokenizer.token_text(ids[0]) == "Hi"  # what decoding alone shows: no space
    assert readable_tokens(tokenizer, ids) == [" Hi", " ", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert token_bytes(tokenizer, ids) == [b" Hi", b" ", b"\xf0", b"\x9f", b"\x98", b"\x80"]


def test_wordpiece_tokens_are_shown_as_their_vocabulary_entries():
    tokenizer = TextTokenizer(wordpiece_tokenizer())
    ids = tokenizer.encode("the cats")
    assert readable_tokens(tokenizer, ids) == ["[CLS]", "the", "cat", "##s", "[SEP]"]


@pytest.mark.slow
def test_the_bundled_model_shows_an_emoji_as_bytes(smollm2_path):
    tokenizer = attendo.load(smollm2_path).tokenizer
    ids = tokenizer.encode(f"Hi {EMOJI} café")
    assert readable_tokens(tokenizer, ids) == ["Hi", " <0xF0><0x9F><0x98>", "<0x80>", " café"]


# --- sampling stages --------------------------------------------------------------------------


def entropy(probs: torch.Tensor) -> float:
    return -sum(p * math.log2(p) for p in probs.tolist() if p > 0)


def test_stage_invariants_against_independent_math():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(300, generator=generator) * 2.5
    history = torch.tensor([3, 3, 7, 11])
    settings = SamplingSettings(do_sample=True, temperature=0.8, top_k=40, top_p=0.8, min_p=0.05,
                                repetition_penalty=1.4, frequency_penalty=0.5)  # fmt: skip
    report = stages_report(logits, settings, str, previous_ids=history, top=200, generator=make_generator(1))
    assert report.names == ["raw", "penalties", "temperature", "top_k", "top_p", "min_p", "final"]
    raw = logits.double().softmax(-1)
    assert report.stages[0].entropy == pytest.approx(entropy(raw), abs=1e-9)
    assert torch.allclose(report.probabilities[0], raw)
    kept = [s.kept for s in report.stages]
    assert kept[:3] == [300, 300, 300] and kept[3] == 40 and kept == sorted(kept, reverse=True)
    for before, after, stage in zip(report.probabilities, report.probabilities[1:], report.stages[1:]):
        assert float(after.sum()) == pytest.approx(1.0)
        survivors = after > 0
        assert stage.kept == int(survivors.sum())
        assert stage.mass == pytest.approx(float(before[survivors].sum()))
        assert stage.entropy == pytest.approx(entropy(after), abs=1e-9)
        if stage.kept < int((before > 0).sum()):
            assert stage.threshold == pytest.approx(float(before[survivors].min()))
            assert float(before[~survivors].max()) <= stage.threshold
        else:
            assert stage.threshold is None and stage.mass == 1.0
    # top-k by hand: the 40 highest after temperature, renormalised
    tempered = report.probabilities[2]
    top = tempered.topk(40)
    assert torch.allclose(report.probabilities[3][top.indices], top.values / top.values.sum())
    # min-p by hand: below 0.05 x the top token's probability is gone
    before = report.probabilities[4]
    assert torch.equal(report.probabilities[5] > 0, (before >= 0.05 * before.max()) & (before > 0))
    # the final stage is what the sampler draws from, and the chosen token is its draw
    drawn = process_logits(logits, settings, history).double().softmax(-1)
    assert torch.allclose(report.probabilities[-1], drawn)
    assert report.chosen.id == int(next_token(logits, settings, history, make_generator(1)))
    listed = report.stages[-1].tokens
    assert [t.id for t in listed] == drawn.argsort(descending=True)[: len(listed)].tolist()


def test_greedy_final_is_the_argmax_after_the_penalties():
    logits = torch.tensor([2.0, 3.0, 1.0, 2.9])
    settings = SamplingSettings(repetition_penalty=2.0)
    report = stages_report(logits, settings, str, previous_ids=torch.tensor([1]))
    assert report.chosen.id == 3 and report.chosen.p == 1.0  # token 1 penalised below token 3
    final = report.stages[-1]
    assert (final.kept, [t.id for t in final.tokens]) == (1, [3])
    with pytest.raises(InvalidSettingError):
        stages_report(logits, settings, str, chosen=4)
    with pytest.raises(InvalidSettingError):
        stages_report(logits, settings, str, top=0)


def test_same_seed_same_token_as_generate_at_every_step(tiny_llama):
    """Step by step with one generator, the stages choose what model.generate chooses."""
    settings = {"temperature": 1.3, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.2, "seed": 11}
    result = tiny_llama.generate("The capital of France", max_new_tokens=6, **settings)
    sampling = tiny_llama.sampling_settings(**settings)
    generator = make_generator(sampling.seed)
    context = list(result.prompt_token_ids)
    for expected in result.token_ids:
        logits = tiny_llama.next_token_logits(context)
        report = stages_report(logits, sampling, str, previous_ids=torch.tensor(context), generator=generator)
        assert report.chosen.id == expected and report.chosen.p > 0
        context.append(expected)
    first = tiny_llama.sampling_stages("The capital of France", **settings)
    assert first.chosen.id == result.token_ids[0]
    assert tiny_llama.sampling_stages(result.prompt_token_ids, **settings).chosen.id == result.token_ids[0]


@pytest.mark.slow
def test_the_bundled_model_stages_choose_what_it_generates(smollm2_path):
    model = attendo.load(smollm2_path)
    for settings in ({"do_sample": False}, {"temperature": 0.9, "top_p": 0.9, "min_p": 0.05, "seed": 3}):
        report = model.sampling_stages("The capital of France is", **settings)
        assert report.chosen.id == model.generate("The capital of France is", max_new_tokens=1, **settings).token_ids[0]
        assert report.chosen.token == readable_tokens(model.tokenizer, [report.chosen.id])[0]


# --- attention --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    directory, reference = _bart(tmp_path_factory)
    reference.set_attn_implementation("eager")
    return attendo.load(directory), reference


def test_decoder_layer_attention_equals_every_layers_maps_and_transformers(tiny_model):
    directory, reference = tiny_model("llama-gqa")
    model = attendo.load(directory)
    ids, target = attention_inputs(model, text="The quick brown fox jumps")
    expected = model.attention_maps([ids])
    with torch.no_grad():
        theirs = reference(torch.tensor([ids]), output_attentions=True).attentions
    for layer in range(model.config.n_layers):
        view = layer_attention(model, ids, target, layer)
        assert set(view.kinds) == {"self"} and view.kinds["self"].shape == (4, len(ids), len(ids))
        assert torch.equal(view.kinds["self"], expected[layer, 0])
        assert max_diff(view.kinds["self"], theirs[layer][0]) < 1e-5
    assert layer_attention(model, ids, target, -1).layer == model.config.n_layers - 1
    with pytest.raises(InvalidSettingError, match="layer"):
        layer_attention(model, ids, target, 2)
    with pytest.raises(TooManyTokensError):
        attention_inputs(model, token_ids=[1] * 513)
    with pytest.raises(InvalidSettingError, match="empty"):
        attention_inputs(model, text=" ")


def test_encoder_decoder_attention_equals_transformers(bart):
    model, reference = bart
    ids, target = attention_inputs(model, text=SENTENCES[1], target="the house")
    assert target[0] == model.decoder_start_token_id
    with torch.no_grad():
        out = reference(torch.tensor([ids]), decoder_input_ids=torch.tensor([target]), output_attentions=True)
    theirs = {"encoder": out.encoder_attentions, "decoder": out.decoder_attentions, "cross": out.cross_attentions}
    for layer in range(3):  # the encoder has 2 layers, the decoder 3
        view = layer_attention(model, ids, target, layer)
        assert set(view.kinds) == ({"encoder", "decoder", "cross"} if layer < 2 else {"decoder", "cross"})
        for kind, weights in view.kinds.items():
            assert max_diff(weights, theirs[kind][layer][0]) < 1e-5


def test_encoder_attention_equals_transformers(tmp_path):
    tokenizer = wordpiece_tokenizer()
    config = transformers.BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    reference = transformers.BertModel(config, add_pooling_layer=False).eval()
    reference.set_attn_implementation("eager")
    reference.save_pretrained(tmp_path)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    model = attendo.load(tmp_path)
    ids, _ = attention_inputs(model, text="the cat is on the tree")
    with torch.no_grad():
        theirs = reference(torch.tensor([ids]), output_attentions=True).attentions
    view = layer_attention(model, ids, None, 1)
    assert view.family == "encoder" and max_diff(view.kinds["self"], theirs[1][0]) < 1e-5
    with pytest.raises(InvalidSettingError, match="target"):
        attention_inputs(model, text="the cat", target="a dog")
    with pytest.raises(UnsupportedModelError):
        model.sampling_stages(ids)


# --- geometry and the data path ---------------------------------------------------------------


def test_pca_equals_numpys_svd():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(7, 12)) @ np.diag(np.linspace(3, 0.1, 12))
    points, shares = pca(torch.tensor(vectors), 3)
    centred = vectors - vectors.mean(axis=0)
    _, singular, right = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ right[:3].T
    assert np.allclose(np.abs(points.numpy()), np.abs(expected))  # each axis up to its sign
    assert np.allclose(shares, (singular**2 / (singular**2).sum())[:3])
    two, two_shares = pca(torch.tensor(vectors[:2]), 3)  # two points span one direction
    assert two[:, 1:].abs().max() == 0 and two_shares[1:] == [0.0, 0.0]
    assert float((two[0, 0] - two[1, 0]).abs()) == pytest.approx(np.linalg.norm(vectors[0] - vectors[1]))


def test_geometry_of_input_embeddings(tiny_llama):
    found = geometry(tiny_llama, ["Hello world", "Paris", "The quick brown fox"], 2)
    table = tiny_llama.network.embed.weight.double()
    by_hand = torch.stack([table[tiny_llama.tokenizer.encode(t, add_special_tokens=False)].mean(0)
                           for t in ["Hello world", "Paris", "The quick brown fox"]])  # fmt: skip
    assert torch.allclose(found.vectors, by_hand)
    cosine = torch.nn.functional.cosine_similarity(by_hand[0], by_hand[1], dim=0)
    assert float(found.cosine[0, 1]) == pytest.approx(float(cosine))
    assert float(found.angle_degrees[0, 1]) == pytest.approx(math.degrees(math.acos(float(cosine))))
    with pytest.raises(InvalidSettingError):
        geometry(tiny_llama, ["one"], 2)
    with pytest.raises(InvalidSettingError):
        geometry(tiny_llama, ["one", "two"], 4)


def test_data_path_of_each_family(tiny_llama, bart):
    path = data_path(tiny_llama)
    assert [s["stage"] for s in path] == ["tokenizer", "embedding", "positions", "blocks", "norm", "lm_head", "softmax"]
    assert path[2]["kind"] == "rope" and path[3]["attention"]["kv_heads"] == 2
    seq2seq = data_path(bart[0])
    assert [s.get("stack") for s in seq2seq if s["stage"] == "blocks"] == ["encoder", "decoder"]
