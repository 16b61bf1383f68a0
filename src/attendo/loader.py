"""attendo.load(): from a name, directory or file to a ready Model.

The steps: find the files → read the header-level facts (config, tensor names and shapes) →
build the network on the meta device (no memory) → check every parameter's sources and shapes →
only then read, combine and assign the tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import nn

from gguf import GGMLQuantizationType as Q

from attendo import kernels, optimize
from attendo.config import ModelConfig
from attendo.errors import CheckpointError, InvalidSettingError, UnsupportedModelError
from attendo.facades import make_model
from attendo.model import Model
from attendo.models import build_network
from attendo.registry import resolve
from attendo.tokenizer import TextTokenizer
from attendo.weights.gguf import read_gguf
from attendo.weights.hf_config import config_from_hf, token_ids
from attendo.weights.names import CheckpointNames, Rule, checkpoint_rules, concat, fit_head, only, rule_for
from attendo.weights.safetensors_dir import PICKLE_SUFFIXES, read_hf_directory, refuse_pickle
from attendo.weights.source import Checkpoint, TensorSource

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """The dtype float weights are read in; the quantized formats (int8, int4, q8_0...) are made
    from float32."""
    if dtype is None or dtype in optimize.QUANTIZED_FORMATS:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        choices = ", ".join([*_DTYPES, *optimize.QUANTIZED_FORMATS])
        raise UnsupportedModelError(f"dtype {dtype!r} is not supported (use one of {choices})")
    return _DTYPES[dtype]


def parse_cache_dtype(kv_cache_dtype: str | None) -> torch.dtype | None:
    """The KV cache's dtype by name; None: the activations' (float32 unless the weights are
    float16 or bfloat16)."""
    if kv_cache_dtype is None:
        return None
    if kv_cache_dtype not in _DTYPES:
        raise InvalidSettingError(f"kv_cache_dtype {kv_cache_dtype!r} is not supported (use one of {', '.join(_DTYPES)})")
    return _DTYPES[kv_cache_dtype]


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


def load_weights(
    network: nn.Module,
    tensors: TensorSource,
    rules: dict[str, Rule],
    dtype: torch.dtype,
    settle: Callable[[nn.Module], object] | None = None,
    keep_blocks: bool = False,
) -> None:
    """Fill a meta-device network from a checkpoint, validating every tensor before reading any.
    settle(block) runs on each block as soon as its weights are in (to quantize it while only
    one block is in float32). keep_blocks: a linear layer or embedding whose weights the file
    stores in a block format optimize.BlockLinear multiplies by is loaded as it is stored."""
    available = tensors.shapes()
    plan = []
    for name, parameter in network.named_parameters():  # tied weights appear once
        found = rule_for(rules, name)
        if found is None:
            raise UnsupportedModelError(f"{tensors.path}: no weight-name rule for parameter {name}")
        rule, sources = found
        missing = [s for s in sources if s not in available]
        if missing:
            raise CheckpointError(f"{tensors.path}: missing tensor {_spelled(tensors, missing[0])} (needed for {name})")
        # One-byte stand-ins with the sources' shapes: cheap to combine, and unlike meta tensors
        # they keep torch's slow-to-import Python reference kernels out of a cold start.
        combined = rule.combine([torch.empty(available[s], dtype=torch.bool) for s in sources])
        if combined.shape != parameter.shape:
            shapes = ", ".join(f"{_spelled(tensors, s)} {list(available[s])}" for s in sources)
            raise CheckpointError(
                f"{tensors.path}: {shapes} does not fit the config, which implies {list(parameter.shape)} for {name}"
            )
        plan.append((name, rule, sources))
    for index, (name, rule, sources) in enumerate(plan):
        module_name, _, leaf = name.rpartition(".")
        module = network.get_submodule(module_name)
        stored = _stored_blocks(tensors, rule, sources) if keep_blocks and leaf == "weight" else None
        if stored is not None and isinstance(module, (nn.Linear, nn.Embedding)):
            network.set_submodule(module_name, _block_layer(module, stored))
        else:
            value = rule.combine([tensors.load(s, dtype) for s in sources]).contiguous()
            setattr(module, leaf, nn.Parameter(value, requires_grad=False))
        block = _block_of(name)
        if settle is not None and block and (index + 1 == len(plan) or _block_of(plan[index + 1][0]) != block):
            settle(network.get_submodule(block))


def _spelled(tensors: TensorSource, name: str) -> str:
    """A tensor's name as its file spells it, when that differs from the Hugging Face name."""
    file_name = getattr(tensors, "file_name", None)
    return name if file_name is None or file_name(name) == name else f"{file_name(name)} ({name})"


def _stored_blocks(tensors: TensorSource, rule: Rule, sources: tuple[str, ...]) -> list[tuple[torch.Tensor, Q]] | None:
    """The sources' rows as stored blocks, one (rows, format) part per run of sources in the same
    format, when all are in block formats and the rule only stacks rows (a transpose or a
    reshape cannot be done on blocks)."""
    read = getattr(tensors, "blocks", None)
    if read is None or rule.combine not in (only, concat):
        return None
    stored = [read(s) for s in sources]
    if any(b is None for b in stored):
        return None
    parts: list[tuple[list[torch.Tensor], Q]] = []
    for rows, qtype in stored:
        if parts and parts[-1][1] == qtype:
            parts[-1][0].append(rows)
        else:
            parts.append(([rows], qtype))
    return [(torch.cat(rows) if len(rows) > 1 else rows[0], qtype) for rows, qtype in parts]


def _block_layer(module: nn.Linear | nn.Embedding, parts: list[tuple[torch.Tensor, Q]]) -> nn.Module:
    if isinstance(module, nn.Embedding):
        ((blocks, qtype),) = parts  # an embedding is one tensor
        return optimize.BlockEmbedding(optimize.BlockLinear(blocks, qtype, module.embedding_dim))
    if len(parts) == 1:
        return optimize.BlockLinear(*parts[0], module.in_features, module.bias)
    return optimize.StackedLinear([optimize.BlockLinear(b, q, module.in_features) for b, q in parts], module.bias)


def _block_of(parameter_name: str) -> str | None:
    """'blocks.3.attn.qkv.weight' → 'blocks.3' (also for an encoder-decoder's stacks)."""
    match = re.match(r"(.*\bblocks\.\d+)\.", parameter_name)
    return match.group(1) if match else None


def load(
    source: str | Path,
    dtype: torch.dtype | str | None = None,
    adapter: str | Path | None = None,
    kv_cache_dtype: str | None = None,
) -> Model:
    """Load a model from a registered name, a Hugging Face-format directory, or a .gguf file.

    adapter: a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors,
    made by attendo finetune --lora or by peft) to apply on top; see attendo.train.lora.

    dtype: the weights' format in memory.
    - None (the default): as the file stores them where attendo can multiply by that format:
      a GGUF file's block matrices (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K...Q6_K) stay in their
      blocks (about the file's size in memory, and decoding reads a quarter or an eighth of
      float32's bytes); everything else, and every matrix when no C compiler could build
      attendo.kernels, is float32.
    - "float32" (a GGUF file fully dequantized: the exact reference), "float16", "bfloat16".
    - "int8" or "int4" (or by ggml's names "q8_0", "q4_0", "q4_1"): weight-only quantization
      of every matrix while loading.

    kv_cache_dtype: what a decoder-only model's KV cache keeps keys and values in: "float32",
    "float16" or "bfloat16" (llama.cpp's --cache-type-k, vLLM's --kv-cache-dtype); None: the
    activations' dtype. A 16-bit cache rounds each key and value once and halves the bytes a
    decode step reads per cached token, which at a server's batch of 16 is as much as the weights.
    """
    path = resolve(source)
    torch_dtype = parse_dtype(dtype)
    cache_dtype = parse_cache_dtype(kv_cache_dtype)
    checkpoint = read_checkpoint(path)
    config = config_from_hf(checkpoint.hf_config, path)
    model_type, available = checkpoint.hf_config["model_type"], checkpoint.tensors.shapes()
    rules = checkpoint_rules(model_type, config, available)
    config = fit_head(config, model_type, rules, available)
    with _on_meta_device():
        network = build_network(config)
    quantize = None
    if isinstance(dtype, str) and dtype in optimize.QUANTIZED_FORMATS:
        quantize = partial(optimize.quantize_weights, qtype=optimize.QUANTIZED_FORMATS[dtype])
    keep_blocks = dtype is None and kernels.available()
    load_weights(network, checkpoint.tensors, rules, torch_dtype, settle=quantize, keep_blocks=keep_blocks)
    if config.tie_embeddings and config.lm_head:
        if isinstance(network.embed, optimize.BlockEmbedding):
            network.lm_head = network.embed.table
        else:
            network.lm_head.weight = network.embed.weight
    if quantize is not None:
        quantize(network)  # what is left: the embedding and the LM head
    network.reset_tables()
    network.eval()
    if cache_dtype is not None:
        if not hasattr(network, "kv_cache_dtype"):
            raise InvalidSettingError(f"kv_cache_dtype applies to decoder-only models; {path.name} is {config.family}")
        network.kv_cache_dtype = cache_dtype
    model = make_model(network, _tokenizer(checkpoint, path), _generation_defaults(checkpoint, config), path)
    model.checkpoint_names = CheckpointNames(model_type, rules, available)
    if adapter is not None:
        from attendo.train.lora import load_adapter

        load_adapter(model, adapter)
    return model


@contextmanager
def _on_meta_device() -> Iterator[None]:
    """Build modules with no memory and no random initialisation: every weight is about to be
    loaded. nn.Embedding's initialiser (normal_) has no native meta kernel; its first call would
    import torch's Python reference kernels, which alone took 1.5 s of a cold start."""
    initialise = nn.Embedding.reset_parameters
    nn.Embedding.reset_parameters = lambda self: None  # type: ignore[method-assign]
    try:
        with torch.device("meta"):
            yield
    finally:
        nn.Embedding.reset_parameters = initialise  # type: ignore[method-assign]


def load_tokenizer(source: str | Path) -> TextTokenizer:
    """A model's tokenizer, with its chat template and special tokens, without its weights."""
    path = resolve(source)
    return _tokenizer(read_checkpoint(path), path)


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


_CONFIG_GENERATION_KEYS = ("forced_bos_token_id", "forced_eos_token_id")


def _generation_defaults(checkpoint: Checkpoint, config: ModelConfig) -> dict:
    """The checkpoint's generation_config.json: sampling defaults and every id that ends generation."""
    generation = dict(checkpoint.generation_config)
    # Older checkpoints (BART's among them) keep generation settings in config.json, which
    # transformers reads when generation_config.json does not set them.
    for key in _CONFIG_GENERATION_KEYS:
        if key not in generation and checkpoint.hf_config.get(key) is not None:
            generation[key] = checkpoint.hf_config[key]
    stop_ids = set(config.eos_token_ids) | set(token_ids(generation.pop("eos_token_id", None)))
    generation["eos_token_ids"] = sorted(stop_ids)
    return generation
