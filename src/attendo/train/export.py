"""Write a network as a Hugging Face-format directory: the loader's way in, run backwards.

`attendo.load` turns a checkpoint's tensors into our parameters through the declarative rules of
weights/names.py (concatenate q/k/v, transpose GPT-2's Conv1D, ...). Saving applies the inverse
of each rule to our parameters, so the directory holds the tensor names and layouts the original
format uses, and `attendo.load`, `transformers` and other tools read it as they read any other.

The architecture goes into config.json either as the source checkpoint had it (fine-tuning keeps
the original config) or, for a model trained from a preset, written here for the model types
whose config can express it exactly (checked by reading the written config back).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from attendo.config import ModelConfig
from attendo.errors import UnsupportedModelError
from attendo.tokenizer import TextTokenizer
from attendo.weights.hf_config import config_from_hf
from attendo.weights.names import _row, checkpoint_rules, concat, only, per_head_qkv, rule_for, transposed

Split = Callable[[torch.Tensor, Sequence[tuple[int, ...]]], list[torch.Tensor]]


def _split_rows(tensor: torch.Tensor, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    return list(tensor.split([shape[0] for shape in shapes], dim=0))


def _inverse(combine: Callable) -> Split:
    """The function that undoes a rule's combine, given the source tensors' shapes."""
    if combine is only:
        return lambda tensor, shapes: [tensor]
    if combine is concat:
        return _split_rows
    if combine is transposed:
        return lambda tensor, shapes: [tensor.t()]
    if combine is _row:
        return lambda tensor, shapes: [tensor.reshape(shapes[0])]
    if isinstance(combine, partial) and combine.func is per_head_qkv:
        heads = combine.keywords["n_heads"]
        # ours (3, heads, head_dim, ...) back to BLOOM's (heads, 3, head_dim, ...)
        return lambda tensor, shapes: [tensor.reshape(3, heads, -1, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)]
    raise UnsupportedModelError(f"no inverse for the weight rule {combine!r}")


def _source_shapes(name: str, tensor: torch.Tensor, parts: int, config: ModelConfig) -> list[tuple[int, ...]]:
    """The shapes of the source tensors one of our parameters was made of: a fused q/k/v is
    [queries; keys; values] (keys and values may have fewer heads), every other fused matrix
    (gate and up, cross-attention keys and values) is equal parts."""
    rest = tuple(tensor.shape[1:])
    if parts == 3 and ".qkv." in name:
        rows = [config.n_heads * config.head_dim] + [config.n_kv_heads * config.head_dim] * 2
    else:
        rows = [tensor.shape[0] // parts] * parts
    return [(r, *rest) for r in rows]


def hf_tensors(
    weights: Mapping[str, torch.Tensor], config: ModelConfig, model_type: str, source_names: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """Our parameters (by name, a tied weight once) under the tensor names and layouts of
    `model_type`.

    source_names: the tensor names of the checkpoint the network was loaded from, if any (they
    say whether a BERT checkpoint used the "bert." prefix; see checkpoint_rules)."""
    rules = checkpoint_rules(model_type, config, source_names)
    tensors: dict[str, torch.Tensor] = {}
    for name, weight in weights.items():
        found = rule_for(rules, name)
        if found is None:
            raise UnsupportedModelError(f"no {model_type} tensor name for the parameter {name}")
        rule, sources = found
        value = weight.detach().cpu()
        if rule.combine is _row:
            shapes = [(1, value.numel())]
        else:
            shapes = _source_shapes(name, value, len(sources), config)
        for source, part in zip(sources, _inverse(rule.combine)(value, shapes)):
            tensors[source] = part.contiguous().clone()  # no views: safetensors refuses shared memory
    return tensors


# --- config.json for a network trained from a preset -------------------------------------------


def _llama_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.context_length,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rms_norm_eps": config.norm_eps,
        "hidden_act": {"gelu_tanh": "gelu_pytorch_tanh"}.get(config.activation, config.activation),
        "attention_bias": config.qkv_bias,
        "mlp_bias": config.mlp_bias,
        "tie_word_embeddings": config.tie_embeddings,
    }


def _gpt2_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_embd": config.dim,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": config.ffn_dim,
        "n_positions": config.context_length,
        "layer_norm_epsilon": config.norm_eps,
        "activation_function": {"gelu_tanh": "gelu_new"}.get(config.activation, config.activation),
        "tie_word_embeddings": config.tie_embeddings,
        # trained without dropout (attendo's layers have none), so transformers should add none
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }


HF_CONFIG_WRITERS: tuple[Callable[[ModelConfig], dict[str, Any]], ...] = (_llama_config, _gpt2_config)


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """A config.json for a decoder-only config: the first model type that reads back as exactly
    this config (so what is saved is what was trained)."""
    ids = {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id}
    eos = list(config.eos_token_ids)
    ids["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
    for write in HF_CONFIG_WRITERS:
        candidate = {**write(config), **ids, "dtype": "float32"}
        try:
            if config_from_hf(candidate, "config") == config:
                return candidate
        except UnsupportedModelError:
            continue
    raise UnsupportedModelError(
        "this architecture has no Hugging Face model type that describes it exactly "
        "(attendo writes llama-style and gpt2-style configs)"
    )


# --- the directory -----------------------------------------------------------------------------


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """write(temporary) beside path, then rename it over path: a reader (or a crash, or Ctrl-C)
    never sees half a file, only the old one or the new one."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any) -> None:
    text = json.dumps(value, indent=2, ensure_ascii=False) + "\n"
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def write_tokenizer(path: Path, tokenizer: TextTokenizer) -> None:
    """tokenizer.json, as the tokenizers library writes it."""
    write_atomically(path, lambda temporary: tokenizer.backend.save(str(temporary)))


def tokenizer_files(tokenizer: TextTokenizer) -> dict[str, Any]:
    """tokenizer_config.json for a tokenizer.json: the special tokens and the chat template."""
    files: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for key in ("bos_token", "eos_token"):
        if getattr(tokenizer, key):
            files[key] = getattr(tokenizer, key)
    if tokenizer.chat_template:
        files["chat_template"] = tokenizer.chat_template
    return files


def save_hf_directory(
    directory: Path,
    weights: Mapping[str, torch.Tensor],
    config: ModelConfig,
    tokenizer: TextTokenizer,
    config_json: dict[str, Any],
    generation_config: dict[str, Any],
    source_names: Sequence[str] = (),
    tokenizer_config: dict[str, Any] | None = None,
) -> None:
    """config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
    generation_config.json in `directory`, each file replaced atomically. weights: every
    parameter of the network by name, a tied weight once (train/checkpoint.py full_weights).
    tokenizer_config: the source model's, when there is one (default: the special tokens and
    chat template of `tokenizer`)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(weights, config, config_json["model_type"], source_names)
    write_safetensors(directory / "model.safetensors", tensors, {"format": "pt"})
    write_json(directory / "config.json", config_json)
    write_tokenizer(directory / "tokenizer.json", tokenizer)
    write_json(directory / "tokenizer_config.json", tokenizer_config or tokenizer_files(tokenizer))
    write_json(directory / "generation_config.json", generation_config)
