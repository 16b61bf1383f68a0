"""attendo.load(): from a name, directory or file to a ready Model.

The steps: find the files → read the header-level facts (config, tensor names and shapes) →
build the network on the meta device (no memory) → check every parameter's sources and shapes →
only then read, combine and assign the tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from attendo.config import ModelConfig
from attendo.errors import CheckpointError, UnsupportedModelError
from attendo.facades import make_model
from attendo.model import Model
from attendo.models import build_network
from attendo.registry import resolve
from attendo.tokenizer import TextTokenizer
from attendo.weights.gguf import read_gguf
from attendo.weights.hf_config import config_from_hf, token_ids
from attendo.weights.names import Rule, checkpoint_rules, fit_head, rule_for
from attendo.weights.safetensors_dir import PICKLE_SUFFIXES, read_hf_directory, refuse_pickle
from attendo.weights.source import Checkpoint, TensorSource

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise UnsupportedModelError(f"dtype {dtype!r} is not supported (use one of {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


def read_checkpoint(path: Path) -> Checkpoint:
    if path.is_dir():
        return read_hf_directory(path)
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if path.suffix == ".gguf":
        return read_gguf(path)
    if path.suffix == ".safetensors":
        return read_hf_directory(path.parent)
    raise UnsupportedModelError(f"{path}: unknown checkpoint format (expected a .gguf file or a model directory)")


def load_weights(network: nn.Module, tensors: TensorSource, rules: dict[str, Rule], dtype: torch.dtype) -> None:
    """Fill a meta-device network from a checkpoint, validating every tensor before reading any."""
    available = tensors.shapes()
    plan = []
    for name, parameter in network.named_parameters():  # tied weights appear once
        found = rule_for(rules, name)
        if found is None:
            raise UnsupportedModelError(f"{tensors.path}: no weight-name rule for parameter {name}")
        rule, sources = found
        missing = [s for s in sources if s not in available]
        if missing:
            raise CheckpointError(f"{tensors.path}: missing tensor {missing[0]} (needed for {name})")
        combined = rule.combine([torch.empty(available[s], device="meta") for s in sources])
        if combined.shape != parameter.shape:
            shapes = ", ".join(f"{s} {list(available[s])}" for s in sources)
            raise CheckpointError(
                f"{tensors.path}: {shapes} does not fit the config, which implies {list(parameter.shape)} for {name}"
            )
        plan.append((name, rule, sources))
    for name, rule, sources in plan:
        value = rule.combine([tensors.load(s, dtype) for s in sources]).contiguous()
        module_name, _, leaf = name.rpartition(".")
        setattr(network.get_submodule(module_name), leaf, nn.Parameter(value, requires_grad=False))


def load(source: str | Path, dtype: torch.dtype | str | None = None) -> Model:
    """Load a model from a registered name, a Hugging Face-format directory, or a .gguf file.

    dtype: the weights' dtype in memory (default float32; a GGUF file is dequantized to it).
    """
    path = resolve(source)
    torch_dtype = parse_dtype(dtype)
    checkpoint = read_checkpoint(path)
    config = config_from_hf(checkpoint.hf_config, path)
    model_type, available = checkpoint.hf_config["model_type"], checkpoint.tensors.shapes()
    rules = checkpoint_rules(model_type, config, available)
    config = fit_head(config, model_type, rules, available)
    with torch.device("meta"):
        network = build_network(config)
    load_weights(network, checkpoint.tensors, rules, torch_dtype)
    if config.tie_embeddings and config.lm_head:
        network.lm_head.weight = network.embed.weight
    network.reset_tables()
    network.eval()
    return make_model(network, _tokenizer(checkpoint, path), _generation_defaults(checkpoint, config), path)


def _tokenizer(checkpoint: Checkpoint, path: Path) -> TextTokenizer:
    if checkpoint.tokenizer is None:
        raise CheckpointError(f"{path}: no tokenizer.json beside the weights")
    tc = checkpoint.tokenizer_config

    def token_string(key: str) -> str | None:
        value = tc.get(key)
        return value.get("content") if isinstance(value, dict) else value  # older files store AddedToken dicts

    return TextTokenizer(
        checkpoint.tokenizer,
        chat_template=tc.get("chat_template") if isinstance(tc.get("chat_template"), str) else None,
        bos_token=token_string("bos_token"),
        eos_token=token_string("eos_token"),
    )


def _generation_defaults(checkpoint: Checkpoint, config: ModelConfig) -> dict:
    """The checkpoint's generation_config.json: sampling defaults and every id that ends generation."""
    generation = dict(checkpoint.generation_config)
    stop_ids = set(config.eos_token_ids) | set(token_ids(generation.pop("eos_token_id", None)))
    generation["eos_token_ids"] = sorted(stop_ids)
    return generation
