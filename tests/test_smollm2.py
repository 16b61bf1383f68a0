"""The real bundled model, SmolLM2-135M-Instruct (GGUF Q4_1), against transformers reading the same
file (which dequantizes it to float32, as attendo does with dtype="float32"), and attendo's default
load, which keeps the file's blocks. Each model is loaded once per module."""

from __future__ import annotations

import pytest
import torch

import attendo
from attendo.cli import main

pytestmark = pytest.mark.slow

NAME = "smollm2-135m-instruct"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Emoji 😀👍🏽 and 🦀, CJK 漢字 こんにちは 안녕하세요, accents: naïve café",
    "runs of spaces:  two   three    four\t\ttabs\n\n\nnewlines and 1234567 digits",
]


@pytest.fixture(scope="module")
def smol():
    return attendo.load(NAME, dtype="float32")


@pytest.fixture(scope="module")
def reference(smollm2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name).eval()


@pytest.fixture(scope="module")
def reference_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


def test_the_name_loads_the_bundled_file(smol, smollm2_path):
    assert smol.source == smollm2_path
    assert (smol.config.n_layers, smol.config.dim, smol.config.n_kv_heads) == (30, 576, 3)


def test_greedy_tokens_match_transformers(smol, reference):
    prompts = [
        "The capital of France is",
        "def fibonacci(n):\n",
        smol.chat_prompt([{"role": "user", "content": "What is 2 + 2?"}]),  # ends early with EOS
    ]
    results = smol.generate(prompts, max_new_tokens=20, do_sample=False)
    for result in results:
        ids = torch.tensor([result.prompt_token_ids])
        with torch.no_grad():
            out = reference.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, pad_token_id=None
            )
        assert result.token_ids == out[0, ids.shape[1] :].tolist()
    assert [r.finish_reason for r in results] == ["length", "length", "stop"]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(text, smol, reference_tokenizer):
    ids = smol.tokenizer.encode(text)
    assert ids == reference_tokenizer.encode(text)
    assert smol.tokenizer.decode(ids) == reference_tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Hi!"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another, in 日本語?"},
        ],
    ],
)
def test_chat_template_matches_transformers(messages, smol, reference_tokenizer):
    expected = reference_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert smol.chat_prompt(messages) == expected


def test_cli_generate_knows_the_capital_of_france(smol, capsys, monkeypatch):
    """`attendo generate "The capital of France is" --greedy`, with the default model. Loading it
    again would only repeat the `smol` fixture's attendo.load, so the command gets that model."""
    asked = []
    monkeypatch.setattr("attendo.loader.load", lambda source, dtype=None, adapter=None, kv_cache_dtype=None: asked.append(source) or smol)
    assert main(["generate", "The capital of France is", "--greedy", "-n", "6"]) == 0
    assert asked == [NAME]
    assert "Paris" in capsys.readouterr().out


def _perplexity(model: attendo.Model, ids: list[int]) -> float:
    logits = model.logits([ids])[0, :-1]
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).exp())


def test_by_default_the_file_blocks_stay_in_memory_and_speak_as_float32(smol, smollm2_path):
    """The default load multiplies by the file's own Q4_1 (and Q8_0 embedding) blocks: the
    matrices take what they take in the file, and the text's perplexity stays within 1%."""
    from attendo.bench.workload import PASSAGE
    from attendo.optimize import BlockLinear
    from attendo.weights.gguf import read_header

    model = attendo.load(NAME)
    layers = {id(m): m for m in model.network.modules() if isinstance(m, BlockLinear)}
    assert {m.qtype.name for m in layers.values()} == {"Q4_1", "Q8_0"}
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) for m in model.network.modules())
    _, infos = read_header(smollm2_path)
    assert sum(m.blocks.nbytes for m in layers.values()) == sum(i.n_bytes for i in infos.values() if len(i.shape) == 2)
    ids = smol.tokenizer.encode(PASSAGE * 2, add_special_tokens=False)
    reference, got = _perplexity(smol, ids[:64]), _perplexity(model, ids[:64])  # 64 rows: the kernel's
    assert abs(got / reference - 1) < 0.01, (reference, got)
    assert model.generate("The capital of France is", max_new_tokens=3, do_sample=False).text.strip().startswith("Paris")


def test_int8_weights_stay_within_a_percent_of_float32_perplexity(smol):
    """int8 re-quantizes the file's 4-bit blocks with one scale per row: the drift it adds to the
    dequantized float32 model, measured on a fixed English text."""
    from attendo.bench.workload import PASSAGE

    ids = smol.tokenizer.encode(PASSAGE * 2, add_special_tokens=False)
    quantized = attendo.load(NAME, dtype="int8")
    reference, got = _perplexity(smol, ids), _perplexity(quantized, ids)
    assert abs(got / reference - 1) < 0.01, (reference, got)
    assert quantized.generate("The capital of France is", max_new_tokens=3, do_sample=False).text.strip().startswith("Paris")
