"""Networks assembled from the layers: decoder-only, encoder-only and encoder-decoder."""

from __future__ import annotations

from torch import nn

from attendo.config import ModelConfig
from attendo.errors import UnsupportedModelError
from attendo.models.decoder import DecoderLM


def build_network(config: ModelConfig) -> nn.Module:
    if config.family == "decoder":
        return DecoderLM(config)
    raise UnsupportedModelError(f"the {config.family} family is not implemented yet")
