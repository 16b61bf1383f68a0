"""Networks assembled from the layers: decoder-only, encoder-only and encoder-decoder."""

from __future__ import annotations

from torch import nn

from attendo.config import ModelConfig
from attendo.models.decoder import DecoderLM
from attendo.models.encoder import EncoderLM
from attendo.models.encoder_decoder import EncoderDecoderLM

NETWORKS: dict[str, type[nn.Module]] = {
    "decoder": DecoderLM,
    "encoder": EncoderLM,
    "encoder-decoder": EncoderDecoderLM,
}


def build_network(config: ModelConfig) -> nn.Module:
    return NETWORKS[config.family](config)
