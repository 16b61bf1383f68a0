"""Hugging Face-format directories: config.json, (sharded) safetensors weights, tokenizer files."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from attendo.errors import CheckpointError, ModelNotFoundError, UnsafeCheckpointError
from attendo.weights.source import Checkpoint

_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle(path: Path) -> None:
    raise UnsafeCheckpointError(
        f"{path}: pickle checkpoints are refused (unpickling can run arbitrary code); convert it once, "
        "where you trust the file, with: python -c \"import torch, safetensors.torch as s; "
        "s.save_file(torch.load('IN', weights_only=True), 'model.safetensors')\", "
        "or save_pretrained(DIR, safe_serialization=True) in transformers"
    )


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from a .safetensors header, after checking that every tensor's byte
    range is consistent with its shape and lies inside the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header (says {header_len} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    data_size = size - 8 - header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if dtype not in _DTYPE_SIZES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype}")
        if not 0 <= begin <= end <= data_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} data [{begin}, {end}) lies past the end of the file "
                f"({data_size} data bytes): the file is truncated or corrupt"
            )
        if end - begin != math.prod(shape) * _DTYPE_SIZES[dtype]:
            raise CheckpointError(f"{path}: tensor {name!r} byte size disagrees with its shape {list(shape)}")
        tensors[name] = (dtype, shape)
    return tensors


class SafetensorsTensors:
    """The tensors of one or several safetensors files, memory-mapped."""

    def __init__(self, files: list[Path]) -> None:
        self.path = files[0].parent
        self._file_of: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            for name, (_, shape) in read_safetensors_header(file).items():
                self._file_of[name] = file
                self._shapes[name] = shape
        self._handles: dict[Path, Any] = {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def load(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        file = self._file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        tensor = self._handles[file].get_tensor(name)
        return tensor if dtype is None else tensor.to(dtype)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no weight_map")
        files = sorted({directory / shard for shard in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index}: lists shards that are not in the directory: {', '.join(missing)}")
        return files
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        refuse_pickle(pickles[0])
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def read_hf_directory(directory: Path) -> Checkpoint:
    config_path = directory / "config.json"
    if not config_path.exists():
        raise ModelNotFoundError(f"{directory}: no config.json (not a Hugging Face model directory)")
    hf_config = _read_json(config_path)
    tensors = SafetensorsTensors(_weight_files(directory))
    tokenizer_config = _read_json(directory / "tokenizer_config.json")
    # transformers >= 4.43 may keep the chat template in its own file.
    template_file = directory / "chat_template.jinja"
    if "chat_template" not in tokenizer_config and template_file.exists():
        tokenizer_config["chat_template"] = template_file.read_text(encoding="utf-8")
    tokenizer_file = directory / "tokenizer.json"
    tokenizer = None
    if tokenizer_file.exists():
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise CheckpointError(f"{tokenizer_file}: cannot be read ({e})") from None
    return Checkpoint(
        hf_config=hf_config,
        tensors=tensors,
        tokenizer=tokenizer,
        tokenizer_config=tokenizer_config,
        generation_config=_read_json(directory / "generation_config.json"),
    )
