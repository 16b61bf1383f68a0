"""Which Model class fronts each family: what a user can call depends on the kind of network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from attendo import fused, optimize
from attendo.errors import UnsupportedModelError
from attendo.model import Model
from attendo.model_encoder import EncoderModel
from attendo.model_seq2seq import Seq2SeqModel
from attendo.tokenizer import TextTokenizer
from attendo.weights.sentence_transformers import read_pooling


def make_model(network: nn.Module, tokenizer: TextTokenizer, generation_defaults: dict[str, Any], source: Path) -> Model:
    fused.fuse_blocks(optimize.use_kernels(network))  # batch-invariant kernels, the blocks in one C call
    family = network.config.family
    if family == "encoder":
        try:
            pooling, problem = read_pooling(source), None
        except UnsupportedModelError as e:  # the model still loads: logits and fill-mask work
            pooling, problem = None, str(e)
        return EncoderModel(network, tokenizer, generation_defaults, source, pooling, problem)
    if family == "encoder-decoder":
        return Seq2SeqModel(network, tokenizer, generation_defaults, source)
    return Model(network, tokenizer, generation_defaults, source)
