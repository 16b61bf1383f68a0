"""Generation on a tiny random LLaMA: batching, seeds, sampling limits, stop strings, EOS, logprobs,
streaming (driven end to end and through TextStream directly), limits and invalid settings, and
chat templates against transformers."""

from __future__ import annotations

import json

import pytest
import torch

import attendo
from attendo import ContextLengthError, InvalidSettingError
from attendo.generation.text import TextStream
from attendo.tokenizer import TextTokenizer
from conftest import copy_model, with_generation_config

PROMPTS = ["Hello", "The quick brown fox jumps over", "def add(a, b):\n    return a + b\n\nprint("]


def first_new_substring(text: str, start: int, length: int = 3) -> int:
    """The first index i >= start where text[i:i+length] is whole characters and occurs nowhere
    before i: a stop string there ends the text exactly at i."""
    for i in range(start, len(text) - length + 1):
        piece = text[i : i + length]
        if "\ufffd" not in piece and text.find(piece) == i:
            return i
    raise AssertionError(f"no usable stop string in {text!r}")


# --- batching and seeds -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama-gqa", "gpt2"])
def test_a_batch_gives_each_prompt_what_it_gets_alone(kind, tiny_model):
    model = attendo.load(tiny_model(kind)[0])
    for settings in ({"do_sample": False}, {"do_sample": True, "seed": 3}):
        together = model.generate(PROMPTS, max_new_tokens=12, **settings)
        alone = [model.generate(p, max_new_tokens=12, **settings) for p in PROMPTS]
        assert len({len(r.prompt_token_ids) for r in together}) == len(PROMPTS)  # really different lengths
        assert [r.token_ids for r in together] == [r.token_ids for r in alone]
        assert [r.text for r in together] == [r.text for r in alone]


def test_a_sequence_that_stops_early_leaves_the_rest_of_the_batch_alone(tiny_llama):
    first = tiny_llama.generate(PROMPTS[0], max_new_tokens=16, do_sample=False).text
    at = first_new_substring(first, start=2)
    stop = first[at : at + 3]
    together = tiny_llama.generate(PROMPTS, max_new_tokens=16, do_sample=False, stop=stop)
    alone = [tiny_llama.generate(p, max_new_tokens=16, do_sample=False, stop=stop) for p in PROMPTS]
    assert [(r.token_ids, r.text, r.finish_reason) for r in together] == [
        (r.token_ids, r.text, r.finish_reason) for r in alone
    ]
    assert together[0].finish_reason == "stop" and "length" in [r.finish_reason for r in together]


def test_same_seed_same_text_and_different_seed_different_text(tiny_llama):
    def sample(seed):
        return tiny_llama.generate("Hello", max_new_tokens=20, do_sample=True, temperature=1.0, seed=seed)

    first, again, other = sample(7), sample(7), sample(8)
    assert first.token_ids == again.token_ids and first.text == again.text
    assert first.token_ids != other.token_ids


def test_temperature_zero_and_top_k_one_are_greedy(tiny_llama):
    greedy = tiny_llama.generate("Hello", max_new_tokens=15, do_sample=False).token_ids
    limits = [
        {"temperature": 0.0},
        {"do_sample": True, "temperature": 0.0, "seed": 1},
        {"do_sample": True, "top_k": 1, "seed": 2},
        {"do_sample": True, "top_k": 1, "temperature": 5.0, "seed": 3},
    ]
    for settings in limits:
        assert tiny_llama.generate("Hello", max_new_tokens=15, **settings).token_ids == greedy, settings


# --- how generation ends ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7])
def test_max_new_tokens_ends_with_length(n, tiny_llama):
    result = tiny_llama.generate("Hello", max_new_tokens=n, do_sample=False)
    assert len(result.token_ids) == n
    assert result.finish_reason == "length"


def test_stop_string_ends_generation_and_is_left_out(tiny_llama):
    full = tiny_llama.generate("Hello", max_new_tokens=30, do_sample=False)
    at = first_new_substring(full.text, start=4)
    stop = full.text[at : at + 3]
    result = tiny_llama.generate("Hello", max_new_tokens=30, do_sample=False, stop=["never seen", stop])
    assert result.text == full.text[:at]
    assert stop not in result.text
    assert result.finish_reason == "stop"
    assert result.token_ids == full.token_ids[: len(result.token_ids)]
    assert len(result.token_ids) < 30


def test_a_stop_string_that_never_appears_changes_nothing(tiny_llama):
    full = tiny_llama.generate("Hello", max_new_tokens=10, do_sample=False)
    result = tiny_llama.generate("Hello", max_new_tokens=10, do_sample=False, stop="never seen")
    assert (result.text, result.token_ids, result.finish_reason) == (full.text, full.token_ids, "length")


def test_eos_token_ends_generation_with_stop(tiny_llama, tiny_llama_dir, tmp_path):
    full = tiny_llama.generate("Hello", max_new_tokens=20, do_sample=False).token_ids
    k = next(k for k in range(2, len(full)) if full[k] not in full[:k])
    unused = next(t for t in range(tiny_llama.config.vocab_size) if t not in full)
    directory = with_generation_config(copy_model(tiny_llama_dir, tmp_path / "m"), eos_token_id=[unused, full[k]])
    model = attendo.load(directory)
    result = model.generate("Hello", max_new_tokens=20, do_sample=False)
    assert result.token_ids == full[: k + 1]
    assert result.finish_reason == "stop"
    assert result.text == model.tokenizer.decode(full[:k])


# --- logprobs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{"do_sample": False}, {"do_sample": True, "seed": 5}])
def test_logprobs_match_reference_log_softmax(settings, tiny_llama, tiny_model):
    reference = tiny_model("llama-gqa")[1]
    result = tiny_llama.generate("Hello world", max_new_tokens=8, logprobs=3, **settings)
    ids = torch.tensor([result.prompt_token_ids + result.token_ids])
    with torch.no_grad():
        logits = reference(ids, attention_mask=torch.ones_like(ids)).logits[0]
    steps = torch.log_softmax(logits[len(result.prompt_token_ids) - 1 : -1], dim=-1)
    assert len(result.logprobs) == len(result.token_ids) == 8
    for token, entry, expected in zip(result.token_ids, result.logprobs, steps):
        assert entry.token_id == token
        assert entry.token == tiny_llama.tokenizer.token_text(token)
        assert entry.logprob == pytest.approx(expected[token].item(), abs=1e-4)
        values, top_ids = expected.topk(3)
        assert [t for t, _, _ in entry.top] == top_ids.tolist()
        assert [v for _, _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)


def test_no_logprobs_unless_asked(tiny_llama):
    assert tiny_llama.generate("Hello", max_new_tokens=3, do_sample=False).logprobs is None


# --- streaming --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_joins_to_the_generated_text(seed, tiny_llama):
    settings = {"do_sample": True, "temperature": 1.0, "seed": seed, "max_new_tokens": 24}
    pieces = list(tiny_llama.stream("The quick", **settings))
    result = tiny_llama.generate("The quick", **settings)
    assert len(pieces) > 1
    assert "".join(pieces) == result.text == tiny_llama.tokenizer.decode(result.token_ids)


def test_stream_with_a_stop_string_never_shows_its_start(tiny_llama):
    settings = {"do_sample": True, "seed": 4, "max_new_tokens": 30}
    full = tiny_llama.generate("Hello", **settings).text
    at = first_new_substring(full, start=6)
    stop = full[at : at + 3]
    pieces = list(tiny_llama.stream("Hello", stop=stop, **settings))
    assert "".join(pieces) == full[:at] == tiny_llama.generate("Hello", stop=stop, **settings).text


@pytest.fixture(scope="module")
def text_tokenizer(bpe_tokenizer) -> TextTokenizer:
    return TextTokenizer(bpe_tokenizer)


def shown_after_each_chunk(
    tokenizer: TextTokenizer, chunks: list[str], stop: list[str]
) -> tuple[list[str], TextStream]:
    """Push each chunk's tokens one at a time (so token boundaries fall where the chunks do);
    return the text shown after each chunk, with the flush at the end as a last entry."""
    stream = TextStream(tokenizer, stop)
    shown = []
    for chunk in chunks:
        shown.append("".join(stream.push(i) for i in tokenizer.encode(chunk, add_special_tokens=False)))
        assert all("\ufffd" not in piece for piece in shown)
    shown.append(stream.flush())
    return shown, stream


def test_text_stream_never_shows_half_a_character(text_tokenizer):
    text = "Crab 🦀, kanji 漢字, café!"
    ids = text_tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(text_tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    partial = [i for i in ids if "\ufffd" in text_tokenizer.token_text(i)]
    assert len(partial) >= 6  # the emoji and CJK characters really are split over several tokens
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text


def test_text_stream_holds_back_a_stop_string_prefix_until_it_is_decided(text_tokenizer):
    shown, stream = shown_after_each_chunk(text_tokenizer, ["Hello wor", "ld <", "|st", "op|> tail"], ["<|stop|>"])
    assert shown == ["Hello wor", "ld ", "", "", ""]
    assert stream.stopped and stream.text == "Hello world "


def test_text_stream_releases_a_prefix_that_was_not_a_stop(text_tokenizer):
    shown, stream = shown_after_each_chunk(text_tokenizer, ["one <|st", "ar", " two <|s"], ["<|stop|>"])
    assert shown == ["one ", "<|star", " two ", "<|s"]  # the last prefix is shown when generation ends
    assert not stream.stopped


def test_text_stream_stop_string_across_a_multibyte_character(text_tokenizer):
    shown, stream = shown_after_each_chunk(text_tokenizer, ["Hi 世", "界", "! more"], ["界!", "never"])
    assert "".join(shown) == "Hi 世"
    assert stream.stopped


def test_text_stream_stop_inside_one_token_run(text_tokenizer):
    shown, stream = shown_after_each_chunk(text_tokenizer, ["abc STOP def"], ["STOP", "c S"])
    assert "".join(shown) == "ab"  # the earliest stop string wins
    assert stream.stopped


# --- limits and settings ----------------------------------------------------------------------


def test_prompt_plus_new_tokens_beyond_the_context_window_is_refused(tiny_llama):
    with pytest.raises(ContextLengthError, match="context window of 128"):
        tiny_llama.generate("Hello", max_new_tokens=200)
    with pytest.raises(ContextLengthError):
        list(tiny_llama.stream("Hello", max_new_tokens=200))


def test_generation_may_fill_the_context_window_exactly(tiny_llama):
    prompt = tiny_llama.tokenizer.encode("Hello")
    room = tiny_llama.config.context_length - len(prompt)
    result = tiny_llama.generate("Hello", max_new_tokens=room, do_sample=False)
    assert len(result.token_ids) == room and result.finish_reason == "length"


@pytest.mark.parametrize(
    "settings",
    [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_new_tokens": 0}, {"max_new_tokens": -3}],
)
def test_invalid_settings_are_refused(settings, tiny_llama):
    with pytest.raises(InvalidSettingError):
        tiny_llama.generate("Hello", **settings)


# --- chat templates ---------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there! "}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 😀 in 漢字?"},
    ],
]


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_chat_template_renders_like_transformers(where, tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    directory = copy_model(tiny_llama_dir, tmp_path / "m")
    if where == "tokenizer_config.json":
        template_file = directory / "chat_template.jinja"
        config = json.loads((directory / where).read_text())
        config["chat_template"] = template_file.read_text()
        (directory / where).write_text(json.dumps(config))
        template_file.unlink()
    model, reference = attendo.load(directory), AutoTokenizer.from_pretrained(directory)
    for messages in CONVERSATIONS:
        expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert model.tokenizer.apply_chat_template(messages) == expected
        assert model.chat_prompt(messages) == expected


def test_chat_answers_the_templated_prompt(tiny_llama):
    messages = CONVERSATIONS[0]
    reply = tiny_llama.chat(messages, max_new_tokens=5, do_sample=False)
    assert reply.text == tiny_llama.generate(tiny_llama.chat_prompt(messages), max_new_tokens=5, do_sample=False).text
