"""The interface every checkpoint reader offers to the loader."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


class TensorSource(Protocol):
    """Tensors of a checkpoint under their Hugging Face names, in Hugging Face layout.

    ``shapes`` is read from the file's header only, so the loader can check every name and shape
    against the model config before any tensor data is read or allocated. A reader of a format
    with ggml's quantized blocks may also offer ``blocks(name) -> (bytes, type) | None``, which the
    loader uses to keep a matrix as it is stored (see GGUFTensors.blocks).
    """

    path: Path

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def load(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        """The tensor as a torch tensor, cast to dtype (None: keep the stored float dtype)."""
        ...


@dataclass
class Checkpoint:
    """Everything a reader found: the architecture as a Hugging Face ``config.json`` dict, the
    tensors, and the tokenizer files' contents (``tokenizer_config.json`` and
    ``generation_config.json`` as dicts, empty when absent)."""

    hf_config: dict[str, Any]
    tensors: TensorSource
    tokenizer: Any  # tokenizers.Tokenizer
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    generation_config: dict[str, Any] = field(default_factory=dict)
