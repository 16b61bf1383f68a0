"""Encoder-decoder models against transformers on tiny random checkpoints loaded through
attendo.load: T5 v1.0 (ReLU, tied head rescaled by d_model**-0.5), T5 v1.1 / FLAN-T5 (gated GELU,
untied head) and BART (learned positions with offset 2, post-LN). Decoder logits, attention
weights, cached == uncached decoding, greedy and beam-search outputs. Then the untrained 2017
Transformer preset."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import attendo
from attendo.generation.seq2seq import encode_prompts
from attendo.model_seq2seq import Seq2SeqModel
from quantized_reference import products_checked, reference_products
from tiny_families import SENTENCES, jitter, max_diff, save, word_tokenizer

transformers = pytest.importorskip("transformers")

T5_SPECIALS = ["<pad>", "</s>", "<unk>"]
BART_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
_T5_SHAPE = dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, relative_attention_max_distance=20,
                 decoder_start_token_id=0)  # fmt: skip


def _t5_v10(tmp_path_factory):
    tokenizer = word_tokenizer(T5_SPECIALS, "$A </s>")
    config = transformers.T5Config(vocab_size=tokenizer.get_vocab_size(), feed_forward_proj="relu", **_T5_SHAPE)
    torch.manual_seed(0)
    reference = jitter(transformers.T5ForConditionalGeneration(config), seed=3)
    return save(reference, tokenizer, tmp_path_factory.mktemp("t5-v10")), reference


def _t5_v11(tmp_path_factory):
    """Saved as the Hub's FLAN-T5 is: tie_word_embeddings false and an lm_head of its own."""
    tokenizer = word_tokenizer(T5_SPECIALS, "$A </s>")
    config = transformers.T5Config(vocab_size=tokenizer.get_vocab_size(), feed_forward_proj="gated-gelu", **_T5_SHAPE)
    torch.manual_seed(1)
    directory = save(
        jitter(transformers.T5ForConditionalGeneration(config), scale=0.3, seed=4),  # peaked: varied beams
        tokenizer,
        tmp_path_factory.mktemp("t5-v11"),
    )
    tensors = load_file(directory / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn(tensors["shared.weight"].shape, generator=torch.Generator().manual_seed(5))
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    hf = json.loads((directory / "config.json").read_text())
    hf.pop("scale_decoder_outputs", None)
    (directory / "config.json").write_text(json.dumps({**hf, "tie_word_embeddings": False}))
    reference = transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()
    assert reference.lm_head.weight.data_ptr() != reference.shared.weight.data_ptr()
    return directory, reference


def _bart(tmp_path_factory):
    tokenizer = word_tokenizer(BART_SPECIALS, "<s> $A </s>")
    config = transformers.BartConfig(
        vocab_size=tokenizer.get_vocab_size(), d_model=32, encoder_layers=2, decoder_layers=3,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
        max_position_embeddings=64, forced_eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(2)
    reference = jitter(transformers.BartForConditionalGeneration(config), seed=6)
    with torch.no_grad():  # a buffer, so jitter skipped it
        reference.final_logits_bias.add_(torch.randn(reference.final_logits_bias.shape) * 0.5)
    return save(reference, tokenizer, tmp_path_factory.mktemp("bart")), reference


MAKERS = {"t5-v1.0": _t5_v10, "t5-v1.1": _t5_v11, "bart": _bart}


@pytest.fixture(scope="module", params=list(MAKERS))
def pair(request, tmp_path_factory):
    """(attendo model, reference) for each tiny encoder-decoder checkpoint."""
    directory, reference = MAKERS[request.param](tmp_path_factory)
    reference.set_attn_implementation("eager")  # returns attention weights
    return attendo.load(directory), reference


def _source(model, text=SENTENCES[1]) -> torch.Tensor:
    return torch.tensor([model.tokenizer.encode(text)])


def test_loads_as_an_encoder_decoder(pair):
    model, reference = pair
    assert isinstance(model, Seq2SeqModel) and model.config.family == "encoder-decoder"
    assert model.decoder_start_token_id == reference.generation_config.decoder_start_token_id
    parameters = sum(p.numel() for p in model.network.parameters())
    logit_bias = getattr(reference, "final_logits_bias", torch.empty(0)).numel()  # a buffer in BART
    assert parameters == sum(p.numel() for p in reference.parameters()) + logit_bias


def test_decoder_logits_match_transformers(pair):
    model, reference = pair
    source = _source(model)
    decoder = torch.tensor([[model.decoder_start_token_id, 7, 12, 30, 9, 44]])
    with torch.no_grad():
        expected = reference(input_ids=source, decoder_input_ids=decoder).logits
    assert max_diff(model.logits(source, decoder_token_ids=decoder), expected) < 1e-4
    first = model.logits(source)  # default decoder input: the start token
    assert max_diff(first, expected[:, :1]) < 1e-4


def test_padded_batch_matches_transformers(pair):
    """Right-padded inputs of different lengths: padding is masked in the encoder and the cross-attention."""
    model, reference = pair
    prompts = [model.tokenizer.encode(t) for t in SENTENCES[:3]]
    pad = model.pad_token_id
    memory = encode_prompts(model.network, prompts, pad)
    longest = max(len(p) for p in prompts)
    source = torch.tensor([p + [pad] * (longest - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (longest - len(p)) for p in prompts])
    decoder = torch.tensor([[model.decoder_start_token_id, 7, 12]] * 3)
    with torch.no_grad():
        expected = reference(input_ids=source, attention_mask=mask, decoder_input_ids=decoder).logits
        ours = model.network.decode(decoder, memory)
    # T5 v1.1's unscaled activations grow large: transformers' own float32 logits here are 1e-4
    # from a float64 run, and attendo's (the kernels sum in another order) about as far away.
    assert max_diff(ours, expected) < 2e-4


def test_attention_maps_match_transformers(pair):
    model, reference = pair
    source = _source(model)
    decoder = torch.tensor([[model.decoder_start_token_id, 7, 12, 30]])
    with torch.no_grad():
        expected = reference(input_ids=source, decoder_input_ids=decoder, output_attentions=True)
    maps = model.attention_maps(source, decoder_token_ids=decoder)
    # the weights of layers after the first follow activations summed in another order (see above)
    assert max_diff(maps["encoder"], torch.stack(expected.encoder_attentions)) < 2e-5
    assert max_diff(maps["decoder"], torch.stack(expected.decoder_attentions)) < 2e-5
    assert max_diff(maps["cross"], torch.stack(expected.cross_attentions)) < 2e-5


def test_cached_decoding_equals_uncached(pair):
    model, _ = pair
    network = model.network
    memory = network.encode(_source(model))
    decoder = torch.tensor([[model.decoder_start_token_id, 7, 12, 30, 9, 44, 3]])
    with torch.no_grad():
        full = network.decode(decoder, memory)
        cache = network.new_cache(1, decoder.shape[1])
        steps = [network.decode(decoder[:, i : i + 1], memory, torch.tensor([[i]]), cache=cache) for i in range(decoder.shape[1])]
    assert max_diff(torch.cat(steps, dim=1), full) < 1e-4


def test_greedy_generation_matches_transformers(pair):
    model, reference = pair
    for text in SENTENCES[1:3]:
        source = _source(model, text)
        expected = reference.generate(source, max_new_tokens=10, do_sample=False, num_beams=1)[0, 1:].tolist()
        result = model.generate(text, max_new_tokens=10)
        assert result.token_ids == expected
        assert result.prompt_token_ids == source[0].tolist()
        assert result.text == model.tokenizer.decode(result.token_ids)


def test_batched_generation_equals_one_by_one(pair):
    model, _ = pair
    prompts = SENTENCES[:4]
    together = model.generate(prompts, max_new_tokens=8)
    alone = [model.generate(p, max_new_tokens=8) for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


@pytest.mark.parametrize(
    ("settings", "stop_early"),
    [
        (dict(num_beams=3), False),
        (dict(num_beams=4, length_penalty=2.0, early_stopping=True), True),
        (dict(num_beams=2, length_penalty=-1.0, no_repeat_ngram_size=2), True),
        (dict(num_beams=3, early_stopping="never", repetition_penalty=1.5), True),
    ],
)
def test_beam_search_matches_transformers(pair, settings, stop_early):
    """Beam search, with the end-of-sequence token either rare (beams run to the limit) or made
    the third greedy token (hypotheses finish early, and early_stopping decides when to stop)."""
    model, reference = pair
    text = SENTENCES[3]
    saved = list(model.eos_token_ids)
    eos = saved[0]
    if stop_early:
        eos = model.generate(text, max_new_tokens=3).token_ids[2]
        model.generation_defaults["eos_token_ids"] = [eos]
    try:
        expected = reference.generate(_source(model, text), max_new_tokens=8, do_sample=False, eos_token_id=eos, **settings)
        result = model.generate(text, max_new_tokens=8, **settings)
    finally:
        model.generation_defaults["eos_token_ids"] = saved
    assert result.token_ids == expected[0, 1:].tolist()


SWEEP = [
    dict(num_beams=2, length_penalty=1.0, early_stopping="never"),
    dict(num_beams=2, length_penalty=3.0, early_stopping="never"),
    dict(num_beams=5, length_penalty=0.5, early_stopping="never"),
    dict(num_beams=3, length_penalty=0.5),
    dict(num_beams=5, length_penalty=1.0),
    dict(num_beams=3, length_penalty=3.0),
    dict(num_beams=2, length_penalty=0.0),
    dict(num_beams=3, length_penalty=3.0, early_stopping=True),
    dict(num_beams=4, length_penalty=-0.5, early_stopping=True),
]


def test_beam_search_sweep_matches_transformers(pair):
    """Many texts, end tokens and settings: where hypotheses finish, and when the search may stop
    (the early-stopping rules), decide the output."""
    model, reference = pair
    saved = list(model.eos_token_ids)
    mismatches = []
    try:
        for text in SENTENCES:
            greedy = model.generate(text, max_new_tokens=4).token_ids
            for eos in dict.fromkeys(greedy[1::2]):  # tokens the model is likely to produce
                model.generation_defaults["eos_token_ids"] = [eos]
                for settings in SWEEP:
                    ours = model.generate(text, max_new_tokens=15, **settings).token_ids
                    theirs = reference.generate(
                        _source(model, text), max_new_tokens=15, do_sample=False, eos_token_id=eos, **settings
                    )[0, 1:].tolist()
                    if ours != theirs:
                        mismatches.append((text, eos, settings, ours, theirs))
    finally:
        model.generation_defaults["eos_token_ids"] = saved
    assert not mismatches


def test_sampling_is_seeded_and_streams(pair):
    model, _ = pair
    a = model.generate(SENTENCES[0], max_new_tokens=8, temperature=1.0, top_k=20, seed=7)
    b = model.generate(SENTENCES[0], max_new_tokens=8, temperature=1.0, top_k=20, seed=7)
    assert a.token_ids == b.token_ids
    assert "".join(model.stream(SENTENCES[0], max_new_tokens=8, seed=3, temperature=0.8)) == model.generate(
        SENTENCES[0], max_new_tokens=8, seed=3, temperature=0.8
    ).text
    assert "".join(model.stream(SENTENCES[0], max_new_tokens=6, num_beams=2)) == model.generate(
        SENTENCES[0], max_new_tokens=6, num_beams=2
    ).text


def test_bad_settings_are_refused(pair):
    model, _ = pair
    with pytest.raises(attendo.InvalidSettingError, match="num_beams"):
        model.generate("the cat", max_new_tokens=4, num_beams=0)
    with pytest.raises(attendo.InvalidSettingError, match="sample"):
        model.generate("the cat", max_new_tokens=4, num_beams=2, do_sample=True)
    with pytest.raises(attendo.InvalidSettingError, match="logprobs"):
        model.generate("the cat", max_new_tokens=4, num_beams=2, logprobs=2)
    with pytest.raises(attendo.ContextLengthError):
        model.generate("the cat", max_new_tokens=10_000)


# -- the 2017 Transformer, untrained ------------------------------------------------------------


def test_transformer_2017_base_has_the_papers_size():
    """d_model 512, 8 heads, 6 + 6 layers, FFN 2048, embeddings shared by encoder, decoder and
    output layer: the paper reports about 65M parameters for its 37000-token vocabulary."""
    model = attendo.build("transformer-2017-base")
    c = model.config
    assert (c.dim, c.n_heads, c.n_layers, c.decoder_layers, c.ffn_dim, c.vocab_size) == (512, 8, 6, 6, 2048, 37000)
    d, f, vocab = 512, 2048, 37000
    attention = 4 * (d * d + d)  # q, k, v, out projections with biases
    feed_forward = d * f + f + f * d + d
    norm = 2 * d
    encoder_layer = attention + feed_forward + 2 * norm
    decoder_layer = 2 * attention + feed_forward + 3 * norm  # self-attention, cross-attention
    expected = vocab * d + 6 * encoder_layer + 6 * decoder_layer  # sinusoids have no parameters
    assert sum(p.numel() for p in model.network.parameters()) == expected == 63_082_496
    assert abs(expected - 65e6) / 65e6 < 0.05


def test_transformer_2017_runs_forward_and_generates():
    model = attendo.build("transformer-2017-base", vocab_size=300, n_layers=2, n_decoder_layers=2)
    source = torch.tensor([model.tokenizer.encode("Hello, world")])
    logits = model.logits(source, decoder_token_ids=[[1, 40, 41]])
    assert logits.shape == (1, 3, 300) and torch.isfinite(logits).all()
    assert len(model.generate("Hello", max_new_tokens=1).token_ids) == 1
    assert len(model.generate("Hello", max_new_tokens=3, num_beams=2).token_ids) <= 3


def test_cli_generates_with_an_encoder_decoder(pair, capsys):
    """Greedy unless sampling is asked for: translation and summaries want the likeliest output."""
    from attendo.cli import main

    model, _ = pair
    for extra, settings in (([], {}), (["--num-beams", "3"], {"num_beams": 3})):
        assert main(["generate", "--model", str(model.source), SENTENCES[1], "-n", "6", *extra]) == 0
        assert capsys.readouterr().out == model.generate(SENTENCES[1], max_new_tokens=6, **settings).text + "\n"


def test_int8_weights_compute_the_reference_products(pair):
    """An encoder-decoder loaded in int8 (its encoder, decoder, cross-attention and LM head all
    in blocks) multiplies as quantized_reference says, and says nearly what that reference says."""
    model, _ = pair
    quantized = attendo.load(model.source, dtype="int8")
    # a layer whose input is not a whole number of 32-wide blocks (here the 48-wide MLP) stays float
    assert not any(isinstance(m, torch.nn.Linear) and m.in_features % 32 == 0 for m in quantized.network.modules())
    for text in SENTENCES[1:3]:
        with products_checked() as agreed:
            tokens = quantized.generate(text, max_new_tokens=10).token_ids
        assert tokens and agreed and all(agreed)
        ids = [quantized.tokenizer.encode(text)]
        got = quantized.logits(ids)
        with reference_products():
            expected = quantized.logits(ids)
        assert (got - expected).norm() / expected.norm() < 0.02
