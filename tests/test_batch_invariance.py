"""A sequence's logits are the same bits whether it runs alone, in a batch of any size, joins a
batch that is already running, or has its prompt prefilled whole or in chunks; in every weight
format; eager and compiled; through the Python API and through the server.

The reference is the sequence run alone: every other way of running it must give exactly
(torch.equal) the logits of every step, not merely the same greedy tokens. That is what makes
temperature 0 and a fixed seed mean one answer. (Before attendo.kernels, torch's fused attention
read a batch's extra masked keys and its matrix multiply chose its blocking by the row count,
and 5 of 8 chat prompts decoded differently alone and in a batch.)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, save_tiny_model
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

import attendo
from attendo import fused, kernels
from attendo.generation.loop import Batch, Request
from attendo.generation.sampler import SamplingSettings
from attendo.optimize import BlockLinear

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"no kernels: {kernels.unavailable_reason()}")
pytestmark = needs_kernels

# The prompt under test, and others of different lengths to keep it company.
TARGET = "The capital of France is Paris. The"
OTHERS = ["Hello world!", "def add(a, b):\n    return a + b", "naïve café 😀", "The quick brown fox jumps over the lazy dog."]
NEW_TOKENS = 6
FLOAT_AND_32_FORMATS = ["float32", "float16", "bfloat16", "q8_0", "q4_0", "q4_1"]
K_FORMATS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q5_0, Q.Q5_1]


class RecordingBatch(Batch):
    """attendo's Batch, keeping the logits it chooses each sequence's next token from."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chosen: list[tuple[object, torch.Tensor]] = []  # (sequence, logits) of every token chosen

    def _accept(self, sequence, logits, token=None):
        self.chosen.append((sequence, logits.clone()))
        return super()._accept(sequence, logits, token)

    def logits(self, sequence) -> list[torch.Tensor]:
        return [logits for chosen, logits in self.chosen if chosen is sequence]


def target_logits(model: attendo.Model, way: str) -> list[torch.Tensor]:
    """Each step's logits for TARGET (greedy), run one way: "alone", "batched" (with four others
    added at once), "joined" (added after three steps of a running batch), "chunked" (its
    prompt prefilled three tokens at a time) or "grouped" (batched, and every prompt prefilled
    three tokens at a time: the chunks of all five share each forward, shorter ones padded),
    "reused" (its slot kept the keys and values of an earlier sequence that began with the same
    four tokens, which it does not prefill again) or "repeated" (an earlier run of the same
    request left its slot holding the whole prompt: only the last prompt token is prefilled)."""
    encode = model.tokenizer.encode
    request = Request(encode(TARGET), SamplingSettings(), NEW_TOKENS)
    others = [Request(encode(text), SamplingSettings(), NEW_TOKENS + 4) for text in OTHERS]
    slots = {"alone": 1, "chunked": 1, "batched": 5, "grouped": 5, "joined": 3, "reused": 2, "repeated": 2}[way]
    fixed = model.decode_step is not None  # a compiled step: a fixed-shape cache of 64 positions
    batch = RecordingBatch(
        model.network, model.tokenizer, [], slots, 64, prefill_chunk=3 if way in ("chunked", "grouped") else 512,
        decode_step=model.decode_step, reuse_prefixes=way in ("reused", "repeated"),
    )  # fmt: skip
    assert batch.cache.fixed_shapes == fixed
    if way in ("batched", "grouped"):
        for other in others[:2]:
            batch.add(other)
    if way == "joined":
        batch.add(others[0])
        batch.add(others[1])
        for _ in range(3):
            batch.step()
    if way in ("reused", "repeated"):
        earlier = request if way == "repeated" else Request(request.prompt_ids[:4] + others[3].prompt_ids, SamplingSettings(), 3)
        batch.add(earlier)
        while batch.busy:
            batch.step()
    target = batch.add(request)
    if way in ("batched", "grouped"):
        for other in others[2:]:
            batch.add(other)
    while batch.busy:
        batch.step()
    assert target.reused == {"reused": 4, "repeated": len(request.prompt_ids) - 1}.get(way, 0)
    return batch.logits(target)


def assert_same_bits(model: attendo.Model, ways=("batched", "joined", "chunked", "grouped", "reused", "repeated")) -> None:
    alone = target_logits(model, "alone")
    assert len(alone) == NEW_TOKENS
    for way in ways:
        got = target_logits(model, way)
        differing = [step for step, (a, b) in enumerate(zip(alone, got)) if not torch.equal(a, b)]
        assert not differing, f"{way}: logits differ from the sequence alone at steps {differing}"


# every format on one architecture, every architecture in two formats
CASES = [("llama-gqa", w) for w in FLOAT_AND_32_FORMATS] + [(k, w) for k in ("gpt2", "qwen2", "llama-tied") for w in ("float32", "q4_1")]


@pytest.mark.parametrize("kind, weights", CASES)
def test_alone_batched_joined_and_chunked_give_the_same_logits(tiny_model, kind, weights):
    model = attendo.load(tiny_model(kind)[0], dtype=weights)
    if weights in ("float16", "bfloat16"):
        assert fused.unfusable(model.network) is not None  # 16-bit activations: the modules' path
    else:
        assert fused.unfusable(model.network) is None
    assert_same_bits(model)



def continue_the_conversation(model: attendo.Model, prompt: str, answer: int, batch_type: type = RecordingBatch, **extra):
    """A first request (`answer` new tokens), then one whose prompt is the first's prompt, its
    answer and more (the next turn of a chat), in one slot that keeps its keys and values; and
    the second again in a fresh batch. Returns the first batch, how many prompt tokens the second
    reused, and each run's logits for the second."""
    encode = model.tokenizer.encode
    batch = batch_type(model.network, model.tokenizer, [], 1, 128, reuse_prefixes=True, **extra)
    first = batch.add(Request(encode(prompt), SamplingSettings(), answer))
    while batch.busy:
        batch.step()
    follow_up = Request(first.request.prompt_ids + first.generated + encode(" Yes, and"), SamplingSettings(), 6)
    second = batch.add(follow_up)
    while batch.busy:
        batch.step()
    fresh = batch_type(model.network, model.tokenizer, [], 1, 128, **extra)
    alone = fresh.add(follow_up)
    while fresh.busy:
        fresh.step()
    assert second.generated == alone.generated
    return batch, second.reused, batch.logits(second), fresh.logits(alone)


@pytest.mark.parametrize("weights", ["float32", "q4_1"])
def test_a_follow_up_prompt_reuses_what_decoding_wrote_and_gets_the_same_logits(tiny_model, weights):
    """The kept keys and values of the first answer were written one decode step at a time; the
    follow-up prefills only its new tokens and gets the bits of a fresh, whole prefill."""
    model = attendo.load(tiny_model("llama-gqa")[0], dtype=weights)
    _, reused, kept, fresh = continue_the_conversation(model, TARGET, 8)
    assert reused == len(model.tokenizer.encode(TARGET)) + 8 - 1  # all but the answer's last token
    assert len(kept) == len(fresh) == 6
    assert all(torch.equal(a, b) for a, b in zip(kept, fresh))


def test_prompts_waiting_together_are_prefilled_in_one_forward(tiny_model):
    """What the "grouped" way above checks bit for bit is one forward per step: five prompts of
    different lengths, their first chunks (3 tokens at most) padded to one (5, 3) batch."""
    model = attendo.load(tiny_model("llama-gqa")[0], dtype="q4_1")
    shapes = []
    hook = model.network.register_forward_hook(lambda module, args, output: shapes.append(tuple(args[0].shape)))
    batch = Batch(model.network, model.tokenizer, [], 5, 64, prefill_chunk=3)
    for text in [TARGET, *OTHERS]:
        batch.add(Request(model.tokenizer.encode(text), SamplingSettings(), 2))
    batch.step()
    hook.remove()
    assert shapes == [(5, 3)]


def test_sampled_sequences_draw_the_same_tokens_alone_and_batched(tiny_model):
    """Rows that sample with the same settings but their own seeds are drawn together in a batch
    (one softmax over the batch's rows): each still gets the tokens it gets alone."""
    model = attendo.load(tiny_model("llama-gqa")[0], dtype="q4_1")
    settings = [SamplingSettings(do_sample=True, temperature=0.9, top_p=0.95, seed=seed) for seed in range(4)]
    requests = [Request(model.tokenizer.encode(text), s, 8) for text, s in zip(OTHERS, settings)]

    def tokens(requests: list[Request]) -> list[list[int]]:
        batch = Batch(model.network, model.tokenizer, [], len(requests), 64)
        sequences = [batch.add(request) for request in requests]
        while batch.busy:
            batch.step()
        return [s.generated for s in sequences]

    together = tokens(requests)
    assert together == [tokens([request])[0] for request in requests]
    assert len({tuple(t) for t in together}) == 4


def test_logits_of_prompts_together_equal_each_alone(tiny_model):
    """model.logits without a cache (the fused blocks, with RoPE from the shared table)."""
    model = attendo.load(tiny_model("llama-gqa")[0], dtype="q4_1")
    prompts = [model.tokenizer.encode(text)[:5] for text in (TARGET, OTHERS[3], OTHERS[1])]
    together = model.logits(prompts)
    assert all(torch.equal(together[i], model.logits([p])[0]) for i, p in enumerate(prompts))

@pytest.mark.parametrize("kind, weights", [("llama-gqa", "float32"), ("llama-gqa", "q4_1"), ("gpt2", "q8_0"), ("qwen2", "q4_0")])
def test_the_modules_path_is_batch_invariant_too(tiny_model, kind, weights):
    """The blocks run as the Python modules do (what attention maps and training use)."""
    model = attendo.load(tiny_model(kind)[0], dtype=weights)
    with fused.disabled():
        assert_same_bits(model)


def _random_blocks(qtype: Q, rows: int, in_features: int, generator: np.random.Generator) -> torch.Tensor:
    """Random blocks of a format, with small float16 scales so that products stay finite."""
    values, size = GGML_QUANT_SIZES[qtype]
    raw = generator.integers(0, 256, size=(rows * in_features // values, size), dtype=np.uint8)
    scales = {Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}
    for offset in scales[qtype]:
        half = generator.uniform(-0.02, 0.02, raw.shape[0]).astype(np.float16)
        raw[:, offset : offset + 2] = half.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(rows, -1))


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory, hf_tokenizer):
    """A tiny LLaMA whose matrices are a whole number of 256-value K-quant blocks wide."""
    TINY_CONFIGS["llama-256"] = (
        "llama",
        {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 2, "max_position_embeddings": 128,
         "num_attention_heads": 4, "num_key_value_heads": 2},
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("llama-256")
    save_tiny_model(directory, "llama-256", hf_tokenizer)
    del TINY_CONFIGS["llama-256"]
    return directory


@pytest.mark.parametrize("qtype", K_FORMATS, ids=lambda q: q.name)
def test_k_quant_and_5_bit_weights_give_the_same_logits(wide_llama, qtype):
    model = attendo.load(wide_llama)
    generator = np.random.default_rng(int(qtype))
    for block in model.network.blocks:
        for parent, name in [(block.attn, "qkv"), (block.attn, "out"), (block.mlp, "up"), (block.mlp, "down")]:
            layer = getattr(parent, name)
            blocks = _random_blocks(qtype, layer.out_features, layer.in_features, generator)
            setattr(parent, name, BlockLinear(blocks, qtype, layer.in_features))
    assert_same_bits(model)


@pytest.mark.slow  # compiling takes half a minute on 2 cores
def test_compiled_decoding_gives_the_same_logits_alone_and_batched(tiny_llama_dir):
    """Networks the fused blocks cannot run (here: float16 activations) compile their decode step."""
    model = attendo.load(tiny_llama_dir, dtype="float16").speed_up("float32")
    assert model.decode_step is not None
    assert_same_bits(model, ways=("batched", "joined"))


def test_fast_path_runs_the_fused_blocks_without_compiling(tiny_llama_dir):
    model = attendo.load(tiny_llama_dir).speed_up("int8")
    assert model.decode_step is None and fused.unfusable(model.network) is None
    assert_same_bits(model)


def test_the_avx2_and_plain_c_builds_are_batch_invariant_too():
    """The library this machine does not build for itself: AVX2 only (other machines' CPUs) and
    plain C (no vector instructions). Rows computed alone equal the same rows in a batch."""
    torch.manual_seed(0)
    x = torch.randn(9, 256)
    weights = {"q4_k": (_random_blocks(Q.Q4_K, 40, 256, np.random.default_rng(0)), int(Q.Q4_K)),
               "float32": (torch.randn(40, 256), kernels.F32)}  # fmt: skip
    q, k, v = torch.randn(1, 4, 9, 32), torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    native = kernels.library
    for flags in (kernels.AVX2_ONLY, kernels.PORTABLE):
        library = native(flags)
        assert not isinstance(library, str), library
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(kernels, "library", lambda *_, flags=flags: native(flags))
            for weight, fmt in weights.values():
                together = kernels.matmul(x, weight, fmt, 40)
                assert all(torch.equal(kernels.matmul(x[i : i + 1], weight, fmt, 40), together[i : i + 1]) for i in range(9))
            whole = kernels.attention(q, k, v, causal, 0.2)
            last = kernels.attention(q[:, :, 8:], k, v, None, 0.2)
            assert torch.equal(whole[:, :, 8:], last)



@pytest.mark.parametrize("fmt", [Q.Q4_K, Q.Q5_0, Q.Q6_K], ids=lambda q: q.name)
def test_packed_products_on_two_threads_equal_one_threads(fmt):
    """The server runs torch on two threads, which split a packed product's panels between them:
    every row's values are the bits one thread computes, alone or batched. (The suite runs torch
    on one thread; this test asks for two, over a matrix of 192 panels.)"""
    torch.manual_seed(0)
    x = torch.randn(9, 256)
    packed = kernels.pack(_random_blocks(fmt, 3072, 256, np.random.default_rng(1)), int(fmt), 256)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.matmul(x, packed, int(fmt), 3072, packed=True)
        torch.set_num_threads(2)
        for _ in range(5):
            assert torch.equal(kernels.matmul(x, packed, int(fmt), 3072, packed=True), one)
            assert all(torch.equal(kernels.matmul(x[i : i + 1], packed, int(fmt), 3072, packed=True), one[i : i + 1]) for i in range(9))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("weights", ["q4_1", "float32"])
def test_the_avx2_builds_fused_decoder_is_batch_invariant_too(tiny_model, weights):
    """The whole fused stack (decoder.c: tiles of prompt rows, heads grouped by key/value head)
    with the library an AVX2-only machine builds; the packed layout is the same on both."""
    model = attendo.load(tiny_model("llama-gqa")[0], dtype=weights)
    native = kernels.library
    avx2 = native(kernels.AVX2_ONLY)
    assert not isinstance(avx2, str), avx2
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "library", lambda *_: avx2)
        assert fused.unfusable(model.network) is None
        assert_same_bits(model)

# --- the bundled model ------------------------------------------------------------------------

TOPICS = ["a red apple", "the moon", "a lighthouse", "bread", "a violin", "rain", "a chess game", "volcanoes"]


@pytest.fixture(scope="module")
def smollm2() -> attendo.Model:
    return attendo.load("smollm2-135m-instruct")


def chat_prompts(model: attendo.Model) -> list[str]:
    return [model.chat_prompt([{"role": "user", "content": f"Write one sentence about {t}."}]) for t in TOPICS]


@pytest.mark.slow
def test_the_bundled_models_eight_chat_prompts_say_the_same_alone_and_batched(smollm2):
    """The report that opened the issue: greedy, 24 tokens, the default load (the file's Q4_1 blocks)."""
    prompts = chat_prompts(smollm2)
    alone = [smollm2.generate(p, do_sample=False, max_new_tokens=24, logprobs=0) for p in prompts]
    batched = smollm2.generate(prompts, do_sample=False, max_new_tokens=24, logprobs=0)
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [[p.logprob for p in r.logprobs] for r in batched] == [[p.logprob for p in r.logprobs] for r in alone]


# --- the server -------------------------------------------------------------------------------


def _server_answers(server, name: str, prompts: list[str], concurrently: bool) -> list[tuple[str, list[float]]]:
    client = server.client()

    def ask(prompt: str) -> tuple[str, list[float]]:
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": prompt}], max_tokens=16, temperature=0, logprobs=True
        )
        choice = reply.choices[0]
        return choice.message.content, [item.logprob for item in choice.logprobs.content]

    if not concurrently:
        return [ask(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(ask, prompts))


def test_server_streams_sent_together_equal_the_same_sent_one_by_one(tiny_llama_dir):
    from test_server import live

    prompts = [f"{OTHERS[i % 4]} {i}" for i in range(12)]
    for server in live({"tiny": attendo.load(tiny_llama_dir)}, max_batch=8, prefill_chunk=4):
        alone = _server_answers(server, "tiny", prompts, concurrently=False)
        together = _server_answers(server, "tiny", prompts, concurrently=True)
    assert together == alone


@pytest.mark.slow
def test_smollm2_server_streams_sent_together_equal_the_same_sent_one_by_one(smollm2):
    from test_server import live

    prompts = [f"Write one sentence about {t}." for t in TOPICS + ["a river", "snow", "a clock", "tea"]]
    for server in live({"smollm2": smollm2}):
        alone = _server_answers(server, "smollm2", prompts, concurrently=False)
        together = _server_answers(server, "smollm2", prompts, concurrently=True)
    assert together == alone


def test_server_prefix_cache_reuses_a_conversations_start_and_answers_the_same(tiny_llama_dir):
    """A chat's second turn repeats the first turn and its answer: with the prefix cache, the
    server reuses their keys and values (usage.prompt_tokens_details.cached_tokens says how
    many) and answers with the bits of a server that prefills everything."""
    from test_server import live

    model = attendo.load(tiny_llama_dir)
    first = [{"role": "user", "content": OTHERS[0]}]
    runs = {}
    for cache in (True, False):
        for server in live({"tiny": model}, prefix_cache=cache, prefill_chunk=4):
            client = server.client()

            def ask(messages):
                reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True)
                choice = reply.choices[0]
                logprobs = [item.logprob for item in choice.logprobs.content]
                return choice.message.content, logprobs, reply.usage.prompt_tokens, reply.usage.prompt_tokens_details.cached_tokens

            answer = ask(first)
            second = first + [{"role": "assistant", "content": answer[0]}, {"role": "user", "content": "Go on."}]
            runs[cache] = (answer, ask(second))
    assert [run[:2] for run in runs[True]] == [run[:2] for run in runs[False]]
    (_, _, first_prompt, first_cached), (_, _, _, second_cached) = runs[True]
    assert first_cached <= 1  # at most the warm-up's one token (the BOS token a template may begin with)
    assert first_prompt - 1 <= second_cached  # the first turn at least (its answer may re-tokenize differently)
    assert [run[3] for run in runs[False]] == [0, 0]
