"""What a user downloading a popular small GGUF file meets, one tiny file per architecture: a
random transformers model written to GGUF as llama.cpp's converter writes it (names from gguf's
own tensor map, metadata keys, q/k rows permuted for "llama", Gemma's norms stored as 1 + w, Llama
3's RoPE scaling as a rope_freqs tensor), loaded by attendo and compared with transformers.

- Qwen2.5-style: q/k/v biases, tied head, byte-level BPE with Qwen's pre-tokenizer.
- Qwen3-style: q/k norms, a head_dim that is not hidden / heads, tied head.
- Llama 3.2-style: tied head, llama3-scaled RoPE, byte-level BPE with Llama 3's pre-tokenizer.
- Phi-3-style: q/k/v and gate/up fused in the file, partial rotary, a sliding window, untied head,
  SentencePiece vocabulary with Phi-3's prefix rule.
- Gemma 3: see test_gemma3.py for the architecture; here its file layout, and a SentencePiece
  vocabulary read Gemma's way.

The reference is transformers running the Hugging Face checkpoint the file was written from,
and, where transformers reads the file itself, its tokenizer and weights from the same file.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGUFWriter

import attendo
from test_gguf_reader import MIXED_TEXT, add_metadata, byte_level_vocab, llama_cpp_permute, sentencepiece_vocab

transformers = pytest.importorskip("transformers")

SHAPE = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
CONTEXT = 64
PROMPT = "hello the world. Hello world, hello there!"


def byte_level_metadata(pre: str) -> dict[str, Any]:
    tokens, types, merges = byte_level_vocab()
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": False,
    }  # fmt: skip


def spm_metadata() -> dict[str, Any]:
    return sentencepiece_vocab() | {"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}


def llama3_rope_factors(config) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for Llama 3.1/3.2's RoPE scaling: each
    frequency's divisor, here taken from transformers' own scaled frequencies."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = config.hidden_size // config.num_attention_heads
    plain = 1.0 / config.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return (plain / scaled).numpy().astype(np.float32)


ARCHITECTURES: dict[str, dict[str, Any]] = {
    "qwen2.5": dict(
        model_type="qwen2", arch="qwen2", tokenizer=lambda: byte_level_metadata("qwen2"),
        config={"tie_word_embeddings": True, "rope_theta": 1e6},
    ),
    "qwen3": dict(
        model_type="qwen3", arch="qwen3", tokenizer=lambda: byte_level_metadata("qwen2"),
        config={"tie_word_embeddings": True, "head_dim": 24, "rope_theta": 1e6},
    ),
    "llama3.2": dict(
        model_type="llama", arch="llama", tokenizer=lambda: byte_level_metadata("llama-bpe"),
        config={
            "tie_word_embeddings": True, "rope_theta": 500_000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16},
        },
    ),
    "phi3": dict(
        model_type="phi3", arch="phi3", tokenizer=lambda: spm_metadata() | {"tokenizer.ggml.padding_token_id": 0},
        config={"tie_word_embeddings": False, "partial_rotary_factor": 0.5, "sliding_window": 6, "pad_token_id": 0},
    ),
    "gemma3": dict(
        # llama.cpp's Gemma converter says no space goes before the text.
        model_type="gemma3_text", arch="gemma3", tokenizer=lambda: spm_metadata() | {"tokenizer.ggml.add_space_prefix": False},
        # Six layers: llama.cpp makes every 6th layer global, and the file has no key to say otherwise.
        config={"num_hidden_layers": 6, "head_dim": 24, "sliding_window": 4, "query_pre_attn_scalar": 24},
    ),
}  # fmt: skip


def hf_model(kind: str, vocab_size: int, directory: Path):
    spec = ARCHITECTURES[kind]
    config = transformers.AutoConfig.for_model(
        spec["model_type"], vocab_size=vocab_size, max_position_embeddings=CONTEXT, bos_token_id=1, eos_token_id=2,
        **{**SHAPE, **spec["config"]},
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # random init leaves biases at 0 and norms at their start: make every tensor count
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(directory)
    return model


def write_model_gguf(
    path: Path,
    kind: str,
    model,
    tokenizer: dict[str, Any],
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """The model as llama.cpp's converter writes it (F32 tensors). edit(items) may change the
    metadata and tensors ({GGUF name: value}) before they are written, to make a broken file."""
    spec, config = ARCHITECTURES[kind], model.config
    arch = spec["arch"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    metadata: dict[str, Any] = {
        f"{arch}.context_length": CONTEXT,
        f"{arch}.embedding_length": config.hidden_size,
        f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.block_count": config.num_hidden_layers,
        f"{arch}.attention.head_count": config.num_attention_heads,
        f"{arch}.attention.head_count_kv": config.num_key_value_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": config.rms_norm_eps,
    }
    rope = config.rope_parameters.get("full_attention", config.rope_parameters)
    metadata[f"{arch}.rope.freq_base"] = float(rope["rope_theta"])
    metadata[f"{arch}.rope.dimension_count"] = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    if head_dim != config.hidden_size // config.num_attention_heads:
        metadata[f"{arch}.attention.key_length"] = metadata[f"{arch}.attention.value_length"] = head_dim
    if getattr(config, "sliding_window", None):
        metadata[f"{arch}.attention.sliding_window"] = config.sliding_window
    metadata |= tokenizer

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    tensors: dict[str, np.ndarray] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if arch == "llama" and ".q_proj." in name:
            tensor = llama_cpp_permute(tensor, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            tensor = llama_cpp_permute(tensor, config.num_key_value_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            tensor = tensor + 1  # llama.cpp's Gemma converter stores (1 + w)
        tensors[names.get_name(name, try_suffixes=(".weight", ".bias"))] = tensor.float().numpy()
    if rope.get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = llama3_rope_factors(config)
    items = metadata | tensors
    if edit is not None:
        edit(items)
    writer = GGUFWriter(path, arch)
    for key, value in items.items():
        if isinstance(value, np.ndarray):
            writer.add_tensor(key, value)
        else:
            add_metadata(writer, key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def written(request, tmp_path_factory):
    """(kind, GGUF path, transformers model of the checkpoint it was written from)."""
    kind, directory = request.param, tmp_path_factory.mktemp(request.param)
    tokenizer = ARCHITECTURES[kind]["tokenizer"]()
    model = hf_model(kind, len(tokenizer["tokenizer.ggml.tokens"]), directory / "hf")
    return kind, write_model_gguf(directory / f"{kind}.gguf", kind, model, tokenizer), model


def test_logits_and_greedy_tokens_match_the_checkpoint(written):
    kind, path, reference = written
    model = attendo.load(path, dtype="float32")
    ids = torch.randint(model.config.vocab_size, (2, 15), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(model.logits(ids), expected, rtol=0, atol=1e-4)
    record: list[torch.Tensor] = []
    with torch.no_grad():
        explicit = model.network(ids, record=record)
    torch.testing.assert_close(explicit, expected, rtol=0, atol=1e-4)

    result = model.generate(PROMPT, max_new_tokens=12, do_sample=False)
    prompt = torch.tensor([result.prompt_token_ids])
    with torch.no_grad():
        out = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert result.token_ids == out[0, prompt.shape[1] :].tolist()


# What transformers' own GGUF reader cannot read right: llama.cpp's rope_freqs tensor (it drops
# it), a Qwen3 head_dim other than hidden / heads (it ignores key_length, as Qwen3-0.6B's 128
# against 1024 / 16 needs), Phi-3's partial rotary (Phi-4-mini's; it ignores
# rope.dimension_count), and a Gemma 3 query scale other than its default of 256.
TRANSFORMERS_MISREADS = {"llama3.2", "qwen3", "phi3", "gemma3"}


def test_transformers_reading_the_same_file_agrees(written):
    """A second reference: transformers' own GGUF reader, on prompts inside the sliding window
    (it does not read a Phi-3 file's window)."""
    kind, path, _ = written
    if kind in TRANSFORMERS_MISREADS:
        pytest.skip(f"transformers misreads a {kind} file")
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    model = attendo.load(path, dtype="float32")
    ids = torch.randint(model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(model.logits(ids), expected, rtol=0, atol=1e-4)


def test_the_files_tokenizer_matches_transformers(written):
    kind, path, _ = written
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = attendo.load(path, dtype="float32").tokenizer
    for text in MIXED_TEXT:
        assert tokenizer.encode(text) == reference.encode(text), text


def test_the_file_and_its_checkpoint_load_alike(written):
    """The GGUF file and the Hugging Face checkpoint it was written from give one architecture and
    the same logits (the file records no generation settings, so token ids are left out)."""
    kind, path, _ = written
    from_file = attendo.load(path, dtype="float32")
    directory = path.parent / "hf"
    from_file.tokenizer.backend.save(str(directory / "tokenizer.json"))
    from_checkpoint = attendo.load(directory)
    # The file stores RoPE factors as float32 (here made from transformers' float32 frequencies).
    factors = from_checkpoint.config.rope_frequency_factors
    assert from_file.config.rope_frequency_factors == (None if factors is None else pytest.approx(factors, rel=1e-6))
    unchecked = dict(bos_token_id=None, eos_token_ids=(), pad_token_id=None, rope_frequency_factors=None)
    assert from_file.config.replace(**unchecked) == from_checkpoint.config.replace(**unchecked)
    ids = torch.randint(from_file.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(from_file.logits(ids), from_checkpoint.logits(ids), rtol=0, atol=1e-6)


# --- broken Gemma files -------------------------------------------------------------------------


def damaged_gemma(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    tokenizer = spm_metadata() | {"tokenizer.ggml.add_space_prefix": False}
    model = hf_model("gemma3", len(tokenizer["tokenizer.ggml.tokens"]), tmp_path / "hf")
    return write_model_gguf(tmp_path / "broken.gguf", "gemma3", model, tokenizer, edit)


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda items: items.pop(key)


def _shrink(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(items: dict[str, Any]) -> None:
        items[key] = items[key][:-1]

    return edit


BROKEN = {
    "missing-tensor": (_drop("blk.1.post_ffw_norm.weight"), r"missing tensor blk\.1\.post_ffw_norm\.weight"),
    "wrong-shape": (_shrink("blk.0.attn_q_norm.weight"), r"blk\.0\.attn_q_norm\.weight .*\[23\] does not fit the config"),
    "missing-key": (_drop("gemma3.attention.sliding_window"), r"'gemma3\.attention\.sliding_window' is missing"),
}


@pytest.mark.parametrize("damage", list(BROKEN))
def test_a_broken_gemma_file_is_a_one_line_error(tmp_path, damage, capsys):
    from attendo.cli import main
    from attendo.errors import CheckpointError

    edit, message = BROKEN[damage]
    path = damaged_gemma(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as error:
        attendo.load(path, dtype="float32")
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    capsys.readouterr()  # what writing the checkpoint printed
    assert main(["generate", "Hello", "-m", str(path), "-n", "3"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("attendo: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("keep", [0.98, 0.6, 0.01])
def test_a_truncated_gemma_file_is_a_one_line_error(tmp_path, keep, capsys):
    from attendo.cli import main
    from attendo.errors import CheckpointError

    path = damaged_gemma(tmp_path, lambda items: None)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated"):
        attendo.load(path)
    capsys.readouterr()  # what writing the checkpoint printed
    assert main(["generate", "Hello", "-m", str(path), "-n", "3"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_an_architecture_attendo_does_not_run_is_named(tmp_path):
    from attendo.errors import UnsupportedModelError

    def rename(items: dict[str, Any]) -> None:
        items["general.architecture"] = "gemma2"

    path = damaged_gemma(tmp_path, rename)
    with pytest.raises(UnsupportedModelError, match=r"GGUF architecture 'gemma2' is not supported \(supported: .*gemma3"):
        attendo.load(path)
