"""GGUF files (llama.cpp's single-file format): the config, tensors and tokenizer they carry.

A GGUF file is a header (typed key/value metadata, then one entry per tensor giving its name, ggml
shape, type and offset) followed by the aligned tensor data. We parse the header ourselves with
``struct``: ``gguf.GGUFReader`` turns every element of the 100k-entry tokenizer arrays into its own
numpy view and needs seconds to open a small model. Tensor data is read only when a tensor is
loaded: kept as its blocks (``blocks``) or dequantized (by attendo.kernels, else ``gguf.quants``).

Everything leaves this module in Hugging Face terms (config keys, tensor names and layouts, a
``tokenizers.Tokenizer``), so the rest of attendo never sees a GGUF key name.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from attendo import kernels
from attendo.errors import CheckpointError, UnsupportedModelError
from attendo.weights import ggml_blocks
from attendo.weights.source import Checkpoint

# --- the header ------------------------------------------------------------------------------

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # version 1 used 32-bit counts; llama.cpp has not written it since 2023
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # ggml tensors have at most four dimensions

# struct codes of the fixed-size value types, all little-endian
_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT32: "f",
    GGUFValueType.FLOAT64: "d", GGUFValueType.BOOL: "?",
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table, checked against the file's size."""

    type: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: ggml's ne reversed, so (out_features, in_features)
    offset: int  # absolute position of the first byte in the file
    n_bytes: int


class _Cursor:
    """Reads GGUF values one after another; reading past the end is a CheckpointError."""

    def __init__(self, buffer: mmap.mmap, path: Path) -> None:
        self.buffer, self.path, self.pos = buffer, path, 0

    def error(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {problem}")

    def take(self, size: int) -> int:
        start = self.pos
        if start + size > len(self.buffer):
            raise self.error(f"header is truncated (needs byte {start + size}, file has {len(self.buffer)})")
        self.pos += size
        return start

    def unpack(self, code: str, count: int = 1) -> tuple[Any, ...]:
        start = self.take(struct.calcsize(code) * count)  # before unpacking: count may be corrupt
        return struct.unpack_from(f"<{count}{code}", self.buffer, start)

    def string(self) -> str:
        (size,) = self.unpack("Q")
        start = self.take(size)
        try:
            return self.buffer[start : start + size].decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"string at byte {start} is not valid UTF-8") from None

    def strings(self, count: int) -> list[str]:
        """count strings in a row: string() inlined, since a vocabulary holds ~100k of them."""
        buffer, pos, end = self.buffer, self.pos, len(self.buffer)
        items = []
        for _ in range(count):
            size = int.from_bytes(buffer[pos : pos + 8], "little")
            if pos + 8 + size > end:
                raise self.error(f"header is truncated (needs byte {pos + 8 + size}, file has {end})")
            try:
                items.append(buffer[pos + 8 : pos + 8 + size].decode("utf-8"))
            except UnicodeDecodeError:
                raise self.error(f"string at byte {pos + 8} is not valid UTF-8") from None
            pos += 8 + size
        self.pos = pos
        return items

    def value(self, kind: int) -> Any:
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            item_kind, count = self.unpack("I")[0], self.unpack("Q")[0]
            if item_kind in _SCALARS:
                return list(self.unpack(_SCALARS[item_kind], count))
            if item_kind == GGUFValueType.STRING:
                return self.strings(count)
            # Strings and nested arrays: each item takes at least 8 bytes, so a corrupt count
            # runs into the end of the file quickly.
            return [self.value(item_kind) for _ in range(count)]
        if kind not in _SCALARS:
            raise self.error(f"unknown metadata value type {kind} at byte {self.pos - 4}")
        (value,) = self.unpack(_SCALARS[kind])
        if kind == GGUFValueType.FLOAT32:
            # The shortest decimal that is this float32, so 1e-5 reads back as 1e-5.
            value = float(str(np.float32(value)))
        return value


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """The metadata and the tensor table of a GGUF file, after checking that every tensor lies
    inside the file."""
    size = path.stat().st_size
    if size < 24:  # magic, version and the two counts
        raise CheckpointError(f"{path}: not a GGUF file (only {size} bytes)")
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        cursor = _Cursor(buffer, path)
        magic = buffer[:4]
        if magic != _MAGIC:
            raise cursor.error(f"not a GGUF file (starts with {magic!r}, expected {_MAGIC!r})")
        cursor.take(4)
        (version,) = cursor.unpack("I")
        if version not in _VERSIONS:
            raise cursor.error(f"GGUF version {version} is not supported (only {_VERSIONS}, little-endian)")
        n_tensors, n_keys = cursor.unpack("Q", 2)

        metadata: dict[str, Any] = {}
        for _ in range(n_keys):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.unpack("I")[0])

        entries = []
        for _ in range(n_tensors):
            name = cursor.string()
            (n_dims,) = cursor.unpack("I")
            if n_dims > _MAX_DIMS:
                raise cursor.error(f"tensor {name!r} has {n_dims} dimensions (ggml allows {_MAX_DIMS})")
            ne = cursor.unpack("Q", n_dims)
            raw_type, offset = cursor.unpack("I")[0], cursor.unpack("Q")[0]
            entries.append((name, ne, raw_type, offset))
        data_start = cursor.pos

    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: general.alignment {alignment!r} is not a power of two")
    data_start += -data_start % alignment

    tensors: dict[str, TensorInfo] = {}
    for name, ne, raw_type, offset in entries:
        if name in tensors:
            raise CheckpointError(f"{path}: tensor {name!r} appears twice")
        tensors[name] = _tensor_info(path, size, name, ne, raw_type, data_start + offset)
    _check_no_overlap(path, tensors)
    return metadata, tensors


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo]) -> None:
    """Each tensor's bytes, as its shape and type imply, must end before the next one's begin: a
    tensor whose size does not match its shape would otherwise be read as its neighbour's data."""
    ordered = sorted(tensors.items(), key=lambda item: item[1].offset)
    for (name, info), (following, after) in zip(ordered, ordered[1:]):
        if info.offset + info.n_bytes > after.offset:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({info.type.name}, shape {list(info.shape)}) needs {info.n_bytes} bytes, "
                f"but {following!r} starts {after.offset - info.offset} bytes after it: its size does not match its shape"
            )


def _tensor_info(
    path: Path, file_size: int, name: str, ne: tuple[int, ...], raw_type: int, offset: int
) -> TensorInfo:
    try:
        kind = GGMLQuantizationType(raw_type)
        block, block_bytes = GGML_QUANT_SIZES[kind]
    except (ValueError, KeyError):
        raise CheckpointError(f"{path}: tensor {name!r} has unknown ggml type {raw_type}") from None
    if ne and ne[0] % block:
        raise CheckpointError(f"{path}: tensor {name!r} rows of {ne[0]} do not fill whole {kind.name} blocks")
    n_bytes = math.prod(ne) // block * block_bytes
    if offset + n_bytes > file_size:
        raise CheckpointError(
            f"{path}: tensor {name!r} data ends at byte {offset + n_bytes}, past the end of the file "
            f"({file_size} bytes): the file is truncated"
        )
    return TensorInfo(kind, tuple(reversed(ne)), offset, n_bytes)


# --- tensors ---------------------------------------------------------------------------------

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_ROPE_FACTOR_TENSORS = ("rope_freqs.weight", "rope_factors_short.weight", "rope_factors_long.weight")
_GGUF_NAME = re.compile(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)")


def _hf_name(path: Path, name: str, layer_names: dict[str, str]) -> str:
    """The Hugging Face name of a GGUF tensor (layer_names: the architecture's own layer parts)."""
    match = _GGUF_NAME.fullmatch(name)
    layer, part, kind = match.groups() if match else (None, None, None)
    table = _GLOBAL_NAMES if layer is None else layer_names
    if part not in table:
        raise UnsupportedModelError(f"{path}: tensor {name!r} has no counterpart in a Hugging Face model of this architecture")
    prefix = "" if layer is None else f"model.layers.{layer}."
    return f"{prefix}{table[part]}.{kind}"


def _unpermute_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q/k projection rows (or biases).

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3)... of each head, while Hugging Face's
    rotate-half RoPE pairs x_i with x_{i + head_dim/2}; the converter therefore interleaves the two
    halves of each head's rows. Here they are put back: (heads, head_dim/2, 2) -> (heads, 2, head_dim/2).
    """
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


class GGUFTensors:
    """The tensors of one GGUF file under Hugging Face names, dequantized to torch on load."""

    def __init__(
        self,
        path: Path,
        infos: dict[str, TensorInfo],
        rope_heads: dict[str, int],
        plus_one: frozenset[str] = frozenset(),
        layer_names: dict[str, str] | None = None,
    ) -> None:
        """``infos`` maps Hugging Face names to GGUF table entries; ``rope_heads`` gives the head
        count of every tensor whose rows llama.cpp permuted for its RoPE; ``plus_one`` names the
        norm weights that llama.cpp stored as 1 + w (Gemma), given back as w; ``layer_names``
        the architecture's GGUF-to-HF layer names, to name tensors in errors as the file does."""
        self.path = path
        self._file_names = {v: k for k, v in (_GLOBAL_NAMES | (layer_names or {})).items()}
        self._infos = infos
        self._rope_heads = rope_heads
        self._plus_one = plus_one
        for name, heads in rope_heads.items():
            rows = infos[name].shape[0]
            if rows % (2 * heads):
                raise CheckpointError(f"{path}: {name} has {rows} rows, not an even head_dim for {heads} heads")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: info.shape for name, info in self._infos.items()}

    def file_name(self, name: str) -> str:
        """The GGUF name of a Hugging Face tensor name (model.layers.3.mlp.up_proj.weight is
        blk.3.ffn_up.weight), present in the file or not."""
        match = re.fullmatch(r"(?:model\.layers\.(\d+)\.)?(.+)\.(weight|bias)", name)
        if not match or match.group(2) not in self._file_names:
            return name
        layer, part, kind = match.groups()
        return f"{'' if layer is None else f'blk.{layer}.'}{self._file_names[part]}.{kind}"

    def blocks(self, name: str) -> tuple[torch.Tensor, GGMLQuantizationType] | None:
        """A matrix stored in one of ggml_blocks.MULTIPLIABLE formats as its bytes, one row of
        blocks per row (rows, bytes per row), in Hugging Face row order; None for any other."""
        info = self._infos[name]
        if info.type not in ggml_blocks.MULTIPLIABLE or len(info.shape) != 2:
            return None
        rows = torch.from_numpy(self._raw(info)).view(info.shape[0], -1)
        if name in self._rope_heads:
            rows = _unpermute_rope(rows, self._rope_heads[name])
        return rows.contiguous(), info.type

    def _raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes, read rather than memory-mapped: mapped pages stay in the process's
        resident memory beside what is made of them, which for a quantized model kept as it is
        stored would count the file twice."""
        data = np.empty(info.n_bytes, dtype=np.uint8)
        with self.path.open("rb") as file:
            file.seek(info.offset)
            if file.readinto(memoryview(data)) != info.n_bytes:
                raise CheckpointError(f"{self.path}: the file ended inside a tensor (was it changed while loading?)")
        return data

    def load(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        """The tensor dequantized; dtype None gives float32 (GGUF's quantized types have no torch dtype)."""
        info = self._infos[name]
        raw = self._raw(info)
        if info.type in ggml_blocks.DECODABLE:
            tensor = ggml_blocks.decode(torch.from_numpy(raw), info.type, info.shape)
        elif kernels.supports(int(info.type), info.shape[-1]):  # gguf's numpy code, 20x faster
            rows = torch.from_numpy(raw).view(-1, info.n_bytes // max(1, math.prod(info.shape[:-1])))
            tensor = kernels.dequantize(rows, int(info.type), info.shape[-1]).reshape(info.shape)
        else:
            try:
                values = dequantize(raw.reshape(*info.shape[:-1], -1), info.type)
            except NotImplementedError:
                problem = f"{name} is stored as {info.type.name}, which gguf cannot dequantize"
                raise UnsupportedModelError(f"{self.path}: {problem}") from None
            tensor = torch.from_numpy(np.require(values, np.float32, ["C", "W"]))
        if name in self._rope_heads:
            tensor = _unpermute_rope(tensor, self._rope_heads[name])
        if name in self._plus_one:
            tensor = tensor - 1
        return tensor.to(dtype or torch.float32)


# --- config ----------------------------------------------------------------------------------


SentencePieceFlavour = Literal["llama", "gemma", "phi3"]  # see _sentencepiece
RopeFactors = dict[str, list[float]]  # the values of the rope_freqs / rope_factors_* tensors, by name


def _required(path: Path, metadata: dict[str, Any], key: str, kind: type) -> Any:
    value = metadata.get(key)
    if value is None:
        raise CheckpointError(f"{path}: metadata key {key!r} is missing")
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CheckpointError(f"{path}: metadata key {key!r} is {value!r}, expected a {kind.__name__}")
    return value


def _rope_scaling(path: Path, metadata: dict[str, Any], arch: str, factors: RopeFactors) -> dict[str, Any] | None:
    """The file's RoPE scaling as a transformers rope_scaling dict. llama.cpp's converter writes
    Llama 3's scaling as a rope_freqs tensor of per-frequency divisors, and Phi-3's long-context
    scaling as rope_factors_short/long tensors; transformers has no name for such a list, so it
    travels as the one rope_type of attendo's own, "frequency_factors" (see hf_config._rope)."""
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    original = metadata.get(f"{arch}.rope.scaling.original_context_length")
    if "rope_freqs.weight" in factors:
        return {"rope_type": "frequency_factors", "factors": factors["rope_freqs.weight"]}
    if "rope_factors_short.weight" in factors:
        # Short factors hold up to the original context, which caps the context attendo allows.
        return {
            "rope_type": "frequency_factors",
            "factors": factors["rope_factors_short.weight"],
            "attention_factor": metadata.get(f"{arch}.rope.scaling.attn_factor", 1.0),
            "original_max_position_embeddings": original,
        }
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _required(path, metadata, f"{arch}.rope.scaling.factor", float)}
    raise UnsupportedModelError(f"{path}: RoPE scaling {kind!r} is not supported (supported: linear, llama3's rope_freqs)")


def _gemma3_config(path: Path, metadata: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's keys. The file leaves out what llama.cpp hard-codes for the architecture: every
    6th layer attends globally, the sliding layers' RoPE base is 10000, and queries are scaled by
    1/sqrt(head_dim), except in the 27B model (62 layers) by 1/sqrt(hidden / heads)."""
    layers = config["num_hidden_layers"]
    sliding = metadata.get("gemma3.attention.sliding_window_pattern")  # newer files: one bool per layer
    if isinstance(sliding, list) and len(sliding) == layers:
        kinds = ["sliding_attention" if s else "full_attention" for s in sliding]
    else:
        kinds = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(layers)]
    scale = metadata.get("gemma3.attention.scale")
    if isinstance(scale, float) and scale > 0:
        query_scalar = scale**-2
    elif layers == 62:
        query_scalar = config["hidden_size"] / config["num_attention_heads"]
    else:
        query_scalar = config["head_dim"]
    full = {"rope_type": "default", "rope_theta": config.pop("rope_theta")} | (config.pop("rope_scaling", None) or {})
    config.pop("hidden_act")
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": query_scalar,
        "sliding_window": _required(path, metadata, "gemma3.attention.sliding_window", int),
        "layer_types": kinds,
        "rope_parameters": {"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        "final_logit_softcapping": metadata.get("gemma3.final_logit_softcapping"),
    }


def _phi3_config(path: Path, metadata: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    window = metadata.get("phi3.attention.sliding_window")
    return {"sliding_window": window} if isinstance(window, int) and window > 0 else {}


@dataclass(frozen=True)
class _Architecture:
    model_type: str
    hf_class: str
    rope_permuted: bool  # llama.cpp permutes q/k rows only where it rotates adjacent pairs
    spells_attention_bias: bool  # False where the model_type itself implies the q/k/v biases
    layer_names: tuple[tuple[str, str], ...] = ()  # GGUF name parts whose HF names differ from LLaMA's
    norms_plus_one: bool = False  # llama.cpp's Gemma converter stores every norm weight as 1 + w
    more_config: Callable[[Path, dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
    sentencepiece: SentencePieceFlavour = "llama"  # how a SentencePiece vocabulary is read


# The GGUF architectures attendo reads, each as the Hugging Face model it was converted from.
# Qwen2 has q/k/v biases but no o_proj bias, which its own model_type says (attention_bias would
# add one); Qwen3 has neither, and q/k norms. Phi-3 keeps q/k/v and gate/up fused, as its Hugging
# Face checkpoints do.
_ARCHITECTURES = {
    "llama": _Architecture("llama", "LlamaForCausalLM", rope_permuted=True, spells_attention_bias=True),
    "qwen2": _Architecture("qwen2", "Qwen2ForCausalLM", rope_permuted=False, spells_attention_bias=False),
    "qwen3": _Architecture(
        "qwen3", "Qwen3ForCausalLM", rope_permuted=False, spells_attention_bias=True,
        layer_names=(("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm")),
    ),
    "phi3": _Architecture(
        "phi3", "Phi3ForCausalLM", rope_permuted=False, spells_attention_bias=False,
        layer_names=(("attn_qkv", "self_attn.qkv_proj"), ("ffn_up", "mlp.gate_up_proj")), more_config=_phi3_config,
        sentencepiece="phi3",
    ),
    "gemma3": _Architecture(
        "gemma3_text", "Gemma3ForCausalLM", rope_permuted=False, spells_attention_bias=False,
        layer_names=(
            ("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm"),
            ("post_attention_norm", "post_attention_layernorm"), ("ffn_norm", "pre_feedforward_layernorm"),
            ("post_ffw_norm", "post_feedforward_layernorm"),
        ),
        norms_plus_one=True, more_config=_gemma3_config, sentencepiece="gemma",
    ),
}  # fmt: skip


def _hf_config(
    path: Path, metadata: dict[str, Any], tensors: dict[str, TensorInfo], rope_factors: RopeFactors
) -> dict[str, Any]:
    arch = metadata["general.architecture"]
    spec = _ARCHITECTURES[arch]
    hidden = _required(path, metadata, f"{arch}.embedding_length", int)
    heads = _required(path, metadata, f"{arch}.attention.head_count", int)
    kv_heads = metadata.get(f"{arch}.attention.head_count_kv", heads)
    if not isinstance(kv_heads, int):  # a per-layer list: layers of different shapes
        raise UnsupportedModelError(f"{path}: per-layer key/value head counts are not supported")
    head_dim = metadata.get(f"{arch}.attention.key_length", hidden // heads)
    rope_dims = metadata.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim and spec.rope_permuted:
        raise UnsupportedModelError(f"{path}: RoPE over {rope_dims} of {head_dim} head dimensions is not supported")
    tokens = metadata.get("tokenizer.ggml.tokens", [])
    config: dict[str, Any] = {
        "model_type": spec.model_type,
        "architectures": [spec.hf_class],
        "vocab_size": metadata.get(f"{arch}.vocab_size", len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": _required(path, metadata, f"{arch}.feed_forward_length", int),
        "num_hidden_layers": _required(path, metadata, f"{arch}.block_count", int),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _required(path, metadata, f"{arch}.attention.layer_norm_rms_epsilon", float),
        "rope_theta": metadata.get(f"{arch}.rope.freq_base", 10_000.0),
        "max_position_embeddings": _required(path, metadata, f"{arch}.context_length", int),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }
    if rope_dims != head_dim:
        config["partial_rotary_factor"] = rope_dims / head_dim
    scaling = _rope_scaling(path, metadata, arch, rope_factors)
    if scaling is not None:
        config["rope_scaling"] = scaling
    if spec.spells_attention_bias:
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if spec.more_config is not None:
        config |= spec.more_config(path, metadata, config)
    return config


# --- tokenizer -------------------------------------------------------------------------------

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (1 normal, 2 unknown, 5 unused, 6 byte)
_TOKEN_NAMES = {"bos": "bos", "eos": "eos", "pad": "padding", "unk": "unknown"}  # HF name: GGUF key part

# How text is split into words before byte-level BPE, by `tokenizer.ggml.pre`: the regexes
# llama.cpp applies for each, in order (each splits the pieces the one before made).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),  # files from before the pre-tokenizer was recorded; as transformers reads them
    "gpt2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
    "deepseek-r1-qwen": (_QWEN2_SPLIT,),
}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes: printable Latin-1 bytes stand for themselves,
    the rest (control characters, space, soft hyphen...) take the code points from 256 upwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _byte_level_pre_tokenizer(path: Path, pre: str) -> pre_tokenizers.PreTokenizer:
    if pre not in _PRE_SPLITS:
        raise UnsupportedModelError(
            f"{path}: tokenizer pre-tokenizer {pre!r} is not supported (known: {', '.join(_PRE_SPLITS)})"
        )
    splits = [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in _PRE_SPLITS[pre]]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _merges(path: Path, metadata: dict[str, Any]) -> list[tuple[str, str]]:
    merges = []
    for merge in metadata["tokenizer.ggml.merges"]:
        pair = merge.split(" ")
        if len(pair) != 2:
            raise CheckpointError(f"{path}: tokenizer merge {merge!r} is not two tokens")
        merges.append((pair[0], pair[1]))
    return merges


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE stores no merges: each token's score is the priority of the merge that
    makes it. Every split of a token into two tokens is such a merge; highest score first, ties
    by shorter left then right part, then by the parts' ids."""
    vocab = {token: index for index, token in enumerate(tokens)}
    candidates = []
    for token, score in dict(zip(tokens, scores)).items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        known = [(left, right) for left, right in splits if left in vocab and right in vocab]
        known.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates += [(left, right, score) for left, right in known]
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _byte_level(path: Path, metadata: dict[str, Any], tokens: list[str]) -> tuple[Tokenizer, set[str]]:
    """GPT-2-style BPE over bytes; also the characters its tokens are spelled in."""
    alphabet = byte_alphabet()
    spelled_in = set(alphabet.values())
    # Tokens added to the vocabulary as plain text (like "<think>") are stored unspelled.
    vocab = {
        token if set(token) <= spelled_in else "".join(alphabet[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    tokenizer = Tokenizer(models.BPE(vocab, _merges(path, metadata), fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(path, metadata.get("tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, spelled_in


def _sentencepiece(path: Path, metadata: dict[str, Any], tokens: list[str], flavour: SentencePieceFlavour) -> Tokenizer:
    """SentencePiece-style BPE: words start with "▁", unknown characters fall back to <0xXX> bytes.

    The flavours are transformers' readings of each architecture's files: Gemma files spell
    tokens of only spaces with real spaces (the vocabulary has them as "▁▁...") and order their
    merges by the tokens' positions, not their scores; Phi-3 puts "▁" before every text even when
    it starts with a space (as llama.cpp does), where LLaMA's Metaspace does not.
    """
    if flavour == "gemma":
        tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    if "tokenizer.ggml.merges" in metadata:
        merges = _merges(path, metadata)
    elif flavour == "gemma":
        merges = _merges_from_scores(tokens, [-float(i) for i in range(len(tokens))])
    else:
        merges = _merges_from_scores(tokens, metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True))
    prefix_space = metadata.get("tokenizer.ggml.add_space_prefix", True)
    if flavour == "phi3":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if prefix_space else "never", split=False
        )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if prefix_space else steps)
    return tokenizer


def _tokenizer(
    path: Path,
    metadata: dict[str, Any],
    bos: tuple[str, int] | None,
    eos: tuple[str, int] | None,
    flavour: SentencePieceFlavour = "llama",
) -> Tokenizer:
    """The tokenizer the metadata describes, built the way transformers builds it from a GGUF, so
    both give the same ids. ``bos``/``eos`` (token, id) are added around each text when given."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens: list[str] = metadata.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise CheckpointError(f"{path}: metadata has no tokenizer.ggml.tokens")
    spelled_in: set[str] | None = None  # characters a special token may use (None: any)
    if kind == "gpt2":
        tokenizer, spelled_in = _byte_level(path, metadata, tokens)
    elif kind == "llama":
        tokenizer = _sentencepiece(path, metadata, tokens, flavour)
    else:
        raise UnsupportedModelError(f"{path}: tokenizer model {kind!r} is not supported (only 'gpt2' and 'llama')")

    # Control tokens (<|im_end|>...) and user-defined ones must match whole in text, never be cut
    # into pieces. In a byte-level vocabulary a control token outside the byte alphabet is a
    # mislabelled one; transformers skips those, and so do we.
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = tokenizer.get_vocab()
    tokenizer.add_special_tokens([
        AddedToken(token, normalized=False, special=True)
        for token, type_ in zip(tokens, types)
        if type_ == _CONTROL and (spelled_in is None or set(token) <= spelled_in)
    ])  # fmt: skip
    tokenizer.add_tokens([
        AddedToken(token, normalized=False, special=False)
        for token, type_ in zip(tokens, types)
        if type_ == _USER_DEFINED and token in vocab
    ])  # fmt: skip

    if bos or eos:
        single = " ".join(part for part in (bos and bos[0], "$A", eos and eos[0]) if part)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=f"{single} {single.replace('$A', '$B')}", special_tokens=[e for e in (bos, eos) if e]
        )
    return tokenizer


def _special_tokens(metadata: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """(token, id) of the bos/eos/padding/unknown tokens the metadata names."""
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    found = {}
    for key in _TOKEN_NAMES.values():
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(index, int) and 0 <= index < len(tokens):
            found[key] = (tokens[index], index)
    return found


def _rope_heads(names: Iterable[str], config: dict[str, Any]) -> dict[str, int]:
    """The head count of each q/k projection weight and bias, whose rows llama.cpp permuted."""
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    return {name: heads[proj] for name in names if (proj := name.split(".")[-2]) in heads}


# --- the whole file --------------------------------------------------------------------------


def read_gguf(path: str | Path) -> Checkpoint:
    """Everything in a GGUF file, in Hugging Face terms (see ``Checkpoint``).

    Only the header is read here; tensor data is mapped and dequantized by ``tensors.load``.
    """
    path = Path(path)
    metadata, infos = read_header(path)
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or arch not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(_ARCHITECTURES)})"
        )
    spec = _ARCHITECTURES[arch]
    # RoPE factor tensors describe the positions, not weights: they go into the config.
    rope_factors = {
        name: GGUFTensors(path, infos, {}).load(name, None).flatten().tolist()
        for name in _ROPE_FACTOR_TENSORS
        if name in infos
    }
    hf_config = _hf_config(path, metadata, infos, rope_factors)
    layer_names = _LAYER_NAMES | dict(spec.layer_names)
    named = {_hf_name(path, name, layer_names): info for name, info in infos.items() if name not in _ROPE_FACTOR_TENSORS}
    rope_heads = _rope_heads(named, hf_config) if spec.rope_permuted else {}
    plus_one = frozenset(name for name in named if spec.norms_plus_one and name.endswith("norm.weight"))

    special = _special_tokens(metadata)
    # llama.cpp adds BOS to SentencePiece vocabularies unless told otherwise, not to byte-level ones.
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", metadata.get("tokenizer.ggml.model") == "llama")
    add_eos = metadata.get("tokenizer.ggml.add_eos_token", False)
    bos, eos = special.get("bos") if add_bos else None, special.get("eos") if add_eos else None
    tokenizer = _tokenizer(path, metadata, bos, eos, spec.sentencepiece)
    tokenizer_config = {
        "chat_template": metadata.get("tokenizer.chat_template"),
        **{f"{name}_token": special[key][0] if key in special else None for name, key in _TOKEN_NAMES.items()},
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
    }
    # Generation stops at end-of-sequence and, in chat models, at end-of-turn/-message tokens.
    stops = [metadata.get(f"tokenizer.ggml.{kind}_token_id") for kind in ("eos", "eot", "eom")]
    stops = list(dict.fromkeys(stop for stop in stops if stop is not None))
    generation_config = {
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": stops if len(stops) > 1 else (stops[0] if stops else None),
    }
    return Checkpoint(
        hf_config=hf_config,
        tensors=GGUFTensors(path, named, rope_heads, plus_one, layer_names),
        tokenizer=tokenizer,
        tokenizer_config=tokenizer_config,
        generation_config=generation_config,
    )
