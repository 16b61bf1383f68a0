"""Prompt-lookup decoding (attendo.generation.lookup) gives plain decoding's output, bit for bit.

The reference is the plain loop (`Batch`) on the same model: with lookup, every token must be
chosen from exactly (torch.equal) the logits plain decoding chose it from, so the tokens,
texts, stops and logprobs are the same; and the drafts must really be checked and taken (the
passes are fewer than the tokens where the text repeats itself).
"""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_batch_invariance import RecordingBatch, _random_blocks, continue_the_conversation
from test_seq2seq import _t5_v10
from tiny_families import SENTENCES

import attendo
from attendo import fused, kernels
from attendo.cli import main
from attendo.errors import InvalidSettingError
from attendo.generation.lookup import LookupBatch, NgramDrafter
from attendo.generation.loop import Request
from attendo.generation.sampler import SamplingSettings
from attendo.optimize import BlockLinear
from attendo.server import ServerSettings
from attendo.server.scheduler import Scheduler

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"no kernels: {kernels.unavailable_reason()}")

REPEATING = "one two three four five six seven eight one two three four five six seven eight one two three"
DRAFTS = 6


class RecordingLookupBatch(LookupBatch, RecordingBatch):
    """LookupBatch, keeping the logits each token is chosen from (RecordingBatch's _accept)."""


def both_ways(model: attendo.Model, prompt_ids: list[int], new_tokens: int, settings=SamplingSettings(), **request):
    """(sequence, recorded logits) decoded plainly, then with lookup, and the lookup batch."""
    runs = []
    for kind, extra in ((RecordingBatch, {}), (RecordingLookupBatch, {"draft_tokens": DRAFTS})):
        batch = kind(model.network, model.tokenizer, model.eos_token_ids, 1, len(prompt_ids) + new_tokens, **extra)
        sequence = batch.add(Request(prompt_ids, settings, new_tokens, **request))
        while batch.busy:
            batch.step()
        runs.append((sequence, batch.logits(sequence)))
    return runs[0], runs[1], batch


def assert_same(plain, lookup) -> None:
    (p, p_logits), (q, q_logits) = plain, lookup
    assert q.generated == p.generated
    assert (q.stream.text, q.finish_reason) == (p.stream.text, p.finish_reason)
    assert len(q_logits) == len(p_logits)
    differing = [step for step, (a, b) in enumerate(zip(p_logits, q_logits)) if not torch.equal(a, b)]
    assert not differing, f"the logits differ from plain decoding at steps {differing}"


def assert_repeating_text_decodes_the_same(model: attendo.Model, settings=SamplingSettings(), **request):
    """Plain and lookup decoding of REPEATING agree, and drafts were checked; returns both runs."""
    plain, lookup, batch = both_ways(model, model.tokenizer.encode(REPEATING), 24, settings, **request)
    assert_same(plain, lookup)
    assert batch.drafted > 0
    return plain, lookup


def test_a_follow_up_after_lookup_decoding_reuses_only_keys_of_chosen_tokens(tiny_model):
    """Drafts a pass rejected leave their keys behind the sequence's end: a slot keeps only the
    chosen tokens' keys and values, so a follow-up prompt built on the answer gets the logits of
    a fresh prefill."""
    model = attendo.load(tiny_model("llama-gqa")[0], dtype="q4_1")
    batch, reused, kept, fresh = continue_the_conversation(model, REPEATING, 16, RecordingLookupBatch, draft_tokens=DRAFTS)
    assert batch.drafted > batch.accepted > 0  # some drafts were taken and some were not
    assert reused == len(model.tokenizer.encode(REPEATING)) + 16 - 1
    assert len(kept) == len(fresh) == 6
    assert all(torch.equal(a, b) for a, b in zip(kept, fresh))


# --- the drafter --------------------------------------------------------------------------------


def latest_continuation(tokens: list[int], limit: int) -> list[int]:
    """What the drafter should propose, by brute force: the tokens after the latest earlier
    occurrence of the last 4, else 3, else 2 tokens."""
    for n in (4, 3, 2):
        for start in range(len(tokens) - n - 1, -1, -1):
            if n <= len(tokens) - 1 and tokens[start : start + n] == tokens[-n:]:
                return tokens[start + n : start + n + limit]
    return []


def test_the_drafter_proposes_what_followed_the_latest_earlier_occurrence():
    generator = random.Random(0)
    for _ in range(20):
        tokens = [generator.randrange(4) for _ in range(60)]
        drafter = NgramDrafter()
        for end in range(len(tokens)):
            drafter.extend(tokens[end : end + 1])
            limit = generator.randrange(1, 8)
            assert drafter.propose(limit) == latest_continuation(tokens[: end + 1], limit)


def test_the_drafter_proposes_nothing_without_a_repeated_pair():
    drafter = NgramDrafter()
    drafter.extend([1, 2, 3, 4, 5, 1])  # 1 recurs, but no pair does
    assert drafter.propose(4) == []


# --- the same bits as plain decoding ------------------------------------------------------------

TINY_CASES = [("llama-gqa", w) for w in ("float32", "float16", "bfloat16", "q8_0", "q4_0", "q4_1")] + [
    ("gpt2", "q4_1"), ("qwen2", "q8_0"), ("gemma3", "float32"), ("mistral-window", "q4_0"),
]  # fmt: skip


@needs_kernels
@pytest.mark.parametrize("kind, weights", TINY_CASES)
def test_tiny_models_decode_the_same_with_lookup(tiny_model, kind, weights):
    assert_repeating_text_decodes_the_same(attendo.load(tiny_model(kind)[0], dtype=weights))


@needs_kernels
def test_k_quant_weights_decode_the_same_with_lookup(tiny_llama_dir):
    model = attendo.load(tiny_llama_dir)
    generator = np.random.default_rng(0)
    for block in model.network.blocks:  # in features 64: Q5_0's 32-weight blocks (K-quants need 256)
        for parent, name in [(block.attn, "qkv"), (block.attn, "out"), (block.mlp, "up")]:
            layer = getattr(parent, name)
            setattr(parent, name, BlockLinear(_random_blocks(Q.Q5_0, layer.out_features, 64, generator), Q.Q5_0, 64))
    assert_repeating_text_decodes_the_same(model)


@needs_kernels
def test_the_modules_path_decodes_the_same_with_lookup(tiny_llama_dir):
    """The blocks as the Python modules run them (fused C code off): kernels' products and attention."""
    model = attendo.load(tiny_llama_dir, dtype="q4_1")
    with fused.disabled():
        assert_repeating_text_decodes_the_same(model)


@needs_kernels
def test_sampling_with_a_seed_gives_the_same_tokens(tiny_llama_dir):
    """A sampled token is drawn from the same logits with the same generator as without lookup."""
    model = attendo.load(tiny_llama_dir)
    settings = SamplingSettings(do_sample=True, temperature=0.5, top_k=5, repetition_penalty=1.1, seed=3)
    plain, lookup = assert_repeating_text_decodes_the_same(model, settings, logprobs=2)
    assert lookup[0].logprobs == plain[0].logprobs


@needs_kernels
def test_a_stop_string_inside_an_accepted_draft_ends_the_same(tiny_llama_dir):
    model = attendo.load(tiny_llama_dir)
    ids = model.tokenizer.encode(REPEATING)
    text = model.generate(ids, max_new_tokens=24, do_sample=False).text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    plain, lookup, _ = both_ways(model, ids, 24, stop=(stop,))
    assert_same(plain, lookup)
    assert plain[0].finish_reason == "stop"


@pytest.fixture(scope="module")
def smollm2() -> attendo.Model:
    return attendo.load("smollm2-135m-instruct")


SNIPPET = '''def merge_counts(first, second):
    merged = dict(first)
    for word, count in second.items():
        merged[word] = merged.get(word, 0) + count
    return merged
'''
BUNDLED_PROMPTS = {
    "code": ("Rewrite this code with type hints.\n\n" + SNIPPET, 48),
    "quote": ("Repeat exactly: The lighthouse was built in 1871 from granite quarried on the island.", 32),
    "chat": ("Write one sentence about a red apple.", 64),  # few drafts, ends on its end-of-turn token
}


@needs_kernels
@pytest.mark.parametrize("name", BUNDLED_PROMPTS)
def test_the_bundled_model_decodes_the_same_with_lookup(smollm2, name):
    """The default load (the GGUF file's Q4_1 blocks), the chat template, greedy."""
    text, new_tokens = BUNDLED_PROMPTS[name]
    plain, lookup, batch = both_ways(smollm2, smollm2.encode_chat([{"role": "user", "content": text}]), new_tokens)
    assert_same(plain, lookup)
    if name == "chat":
        assert plain[0].finish_reason == "stop" and plain[0].generated[-1] in smollm2.eos_token_ids
    else:
        assert batch.accepted > 0  # the answer copies from the prompt


@needs_kernels
def test_generate_and_stream_take_prompt_lookup_in_fewer_passes(tiny_llama):
    passes = []
    hook = tiny_llama.network.register_forward_hook(lambda *_: passes.append(1))

    def counted(run):
        passes.clear()
        return run(), len(passes)

    try:
        plain, plain_passes = counted(lambda: tiny_llama.generate(REPEATING, max_new_tokens=24, do_sample=False))
        looked, looked_passes = counted(
            lambda: tiny_llama.generate(REPEATING, max_new_tokens=24, do_sample=False, prompt_lookup=DRAFTS)
        )
        streamed, streamed_passes = counted(
            lambda: "".join(tiny_llama.stream(REPEATING, max_new_tokens=24, do_sample=False, prompt_lookup=DRAFTS))
        )
    finally:
        hook.remove()
    assert looked.token_ids == plain.token_ids and streamed == plain.text
    assert looked_passes < plain_passes and streamed_passes < plain_passes


def test_drafts_start_short_and_grow_while_they_hold(tiny_llama):
    """The draft length schedule: 2 tokens first, +2 after a draft taken whole, never above the
    draft_tokens asked for (each pass of r > 1 rows checks r - 1 draft tokens)."""
    rows = []
    hook = tiny_llama.network.register_forward_hook(lambda _, args, __: rows.append(args[0].shape[1]))
    try:
        tiny_llama.generate(REPEATING, max_new_tokens=40, do_sample=False, prompt_lookup=DRAFTS)
    finally:
        hook.remove()
    drafts = [r - 1 for r in rows[1:] if r > 1]  # rows[0]: the prompt's prefill
    assert drafts[0] <= 2 and 2 < max(drafts) <= DRAFTS


# --- where the drafts come from and go: several prompts, the server -----------------------------


def test_prompts_in_a_batch_decode_as_without_lookup(tiny_llama):
    prompts = {REPEATING: 24, "Hello there": 4, "a b a b a b a": 12}  # the others end first: the last drafts alone
    expected = [tiny_llama.generate(p, max_new_tokens=n, do_sample=False).token_ids for p, n in prompts.items()]
    requests = [Request(tiny_llama.tokenizer.encode(p), SamplingSettings(), n) for p, n in prompts.items()]
    batch = tiny_llama._batch(requests, DRAFTS)
    sequences = [batch.add(r) for r in requests]
    while batch.busy:
        batch.step()
    assert [s.generated for s in sequences] == expected
    assert batch.drafted > 0


def test_the_scheduler_streams_lookup_tokens_with_their_own_logprobs(tiny_llama):
    """A step may deliver several tokens of one request: each delta carries its own logprob."""
    expected = tiny_llama.generate(REPEATING, max_new_tokens=16, do_sample=False, logprobs=1)
    scheduler = Scheduler("tiny", tiny_llama, max_batch=2, max_queue=1, max_len=128, prompt_lookup=DRAFTS)
    assert isinstance(scheduler.batch, LookupBatch)
    request = Request(tiny_llama.tokenizer.encode(REPEATING), SamplingSettings(), 16, logprobs=1)
    scheduler.start()
    try:

        async def go():
            ticket = scheduler.submit([request], asyncio.get_running_loop())
            return [d async for d in ticket.deltas()]

        deltas = asyncio.run(asyncio.wait_for(go(), 30))
    finally:
        scheduler.stop()
    assert [d.token_id for d in deltas] == expected.token_ids
    assert [d.logprob for d in deltas] == expected.logprobs
    assert "".join(d.text for d in deltas) == expected.text
    assert scheduler.batch.drafted > 0


def test_the_http_server_answers_the_same_with_lookup(tiny_llama):
    from test_server import live

    expected = tiny_llama.generate(REPEATING, max_new_tokens=16, do_sample=False, logprobs=0)
    for server in live({"tiny": tiny_llama}, prompt_lookup=DRAFTS):
        completion = server.client().completions.create(
            model="tiny", prompt=REPEATING, max_tokens=16, temperature=0, logprobs=0
        )
        sampled = server.client().completions.create(model="tiny", prompt=REPEATING, max_tokens=16, temperature=0.7, seed=1)
    choice = completion.choices[0]
    assert choice.text == expected.text
    assert choice.logprobs.token_logprobs == [p.logprob for p in expected.logprobs]
    assert sampled.choices[0].text == tiny_llama.generate(REPEATING, max_new_tokens=16, temperature=0.7, seed=1).text


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, 1.5, True, "4"])
def test_a_bad_draft_count_is_refused(tiny_llama, value):
    with pytest.raises(InvalidSettingError, match="prompt_lookup"):
        tiny_llama.generate("Hello", max_new_tokens=2, prompt_lookup=value)
    with pytest.raises(InvalidSettingError, match="prompt_lookup"):
        ServerSettings(models=[], prompt_lookup=value)


def test_lookup_with_beam_search_or_an_encoder_decoder_is_refused(tiny_llama, tmp_path_factory):
    with pytest.raises(InvalidSettingError, match="not beam search"):
        tiny_llama.generate("Hello", max_new_tokens=2, num_beams=2, prompt_lookup=4)
    t5 = attendo.load(_t5_v10(tmp_path_factory)[0])
    for call in (t5.generate, lambda *a, **k: list(t5.stream(*a, **k))):
        with pytest.raises(InvalidSettingError, match="decoder-only"):
            call(SENTENCES[0], max_new_tokens=2, prompt_lookup=4)


def test_lookup_with_a_compiled_decode_step_is_refused(tiny_llama_dir):
    """(Compiling happens at the first call; refusing needs none.)"""
    model = attendo.load(tiny_llama_dir, dtype="float16").speed_up("float32")
    assert model.decode_step is not None
    with pytest.raises(InvalidSettingError, match="compiled decode step"):
        model.generate("Hello", max_new_tokens=2, prompt_lookup=4)


@pytest.mark.parametrize(
    "arguments",
    [["generate", "Hello", "--prompt-lookup", "-2"], ["generate", "Hello", "--prompt-lookup", "3", "--num-beams", "2"],
     ["serve", "--prompt-lookup", "-1"]],
)  # fmt: skip
def test_the_command_line_refuses_bad_lookup_settings_in_one_line(tiny_llama_dir, capsys, arguments):
    assert main([*arguments, "-m", str(tiny_llama_dir), "-n" if arguments[0] == "generate" else "--max-len", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attendo: error:") and "prompt_lookup" in err and err.count("\n") == 1


def test_bench_wants_at_least_one_draft_token(capsys):
    assert main(["bench", "--prompt-lookup", "0"]) == 2
    assert "--prompt-lookup takes a number of draft tokens >= 1" in capsys.readouterr().err


def test_the_command_line_generates_the_same_text_with_lookup(tiny_llama_dir, tiny_llama, capsys):
    assert main(["generate", REPEATING, "-m", str(tiny_llama_dir), "--greedy", "-n", "12", "--prompt-lookup", "5"]) == 0
    assert capsys.readouterr().out == tiny_llama.generate(REPEATING, max_new_tokens=12, do_sample=False).text + "\n"
