"""Named architectures as data, and `build()`: an untrained model from one of them.

Every preset is a ModelConfig, the same record that loading a checkpoint produces; the presets
named after registered models equal what `attendo.load` reads from their files (a test checks).
Untrained models are for study: count parameters, watch shapes flow, run the generation loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from attendo.config import ModelConfig
from attendo.errors import ModelNotFoundError
from attendo.facades import make_model
from attendo.model import Model
from attendo.models import build_network
from attendo.tokenizer import TextTokenizer

_GPT2 = dict(
    family="decoder", vocab_size=50257, dim=768, n_layers=12, n_heads=12, ffn_dim=3072, context_length=1024,
    positions="learned", norm="layernorm", mlp_gated=False, activation="gelu_tanh",
    qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True, bos_token_id=50256, eos_token_ids=(50256,),
)  # fmt: skip
_BERT = dict(
    family="encoder", vocab_size=30522, dim=768, n_layers=12, n_heads=12, ffn_dim=3072, context_length=512,
    positions="learned", norm="layernorm", norm_eps=1e-12, pre_norm=False, embedding_norm=True, final_norm=False,
    mlp_gated=False, activation="gelu", qkv_bias=True, out_bias=True, mlp_bias=True, token_types=2,
    tie_embeddings=True, head_transform=True, head_bias=True, pad_token_id=0,
)  # fmt: skip
_T5 = dict(
    family="encoder-decoder", vocab_size=32128, dim=512, n_layers=6, n_decoder_layers=6, n_heads=8, head_dim=64,
    ffn_dim=2048, context_length=512, positions="relative", norm="rmsnorm", norm_eps=1e-6, mlp_gated=False,
    activation="relu", attention_scale=1.0, tie_embeddings=True, logit_scale=512**-0.5,
    pad_token_id=0, eos_token_ids=(1,), decoder_start_token_id=0,
)  # fmt: skip
_BART = dict(
    family="encoder-decoder", vocab_size=50265, dim=768, n_layers=6, n_decoder_layers=6, n_heads=12, ffn_dim=3072,
    context_length=1024, positions="learned", position_offset=2, norm="layernorm", pre_norm=False,
    embedding_norm=True, final_norm=False, mlp_gated=False, activation="gelu", qkv_bias=True, out_bias=True,
    mlp_bias=True, tie_embeddings=True, head_bias=True,
    bos_token_id=0, eos_token_ids=(2,), pad_token_id=1, decoder_start_token_id=2,
)  # fmt: skip
# "Attention is all you need" (2017), base model: sinusoidal positions, post-LN, ReLU, embeddings
# scaled by sqrt(d_model) and shared between encoder, decoder and the output layer (a 37000-token
# shared vocabulary in the paper). The byte-level tokenizer of `build` uses ids 0-2 as specials.
_TRANSFORMER_2017 = dict(
    family="encoder-decoder", vocab_size=37000, dim=512, n_layers=6, n_decoder_layers=6, n_heads=8, ffn_dim=2048,
    context_length=1024, positions="sinusoidal", norm="layernorm", norm_eps=1e-6, pre_norm=False, final_norm=False,
    mlp_gated=False, activation="relu", qkv_bias=True, out_bias=True, mlp_bias=True,
    embedding_scale=512**0.5, tie_embeddings=True,
    pad_token_id=0, bos_token_id=1, eos_token_ids=(2,), decoder_start_token_id=1,
)  # fmt: skip

# What each preset declares; fields it leaves out (n_kv_heads, head_dim, ...) follow from the
# others, also after overrides: preset("gpt2", n_heads=4) gets head_dim = dim / 4.
_DECLARED: dict[str, dict[str, Any]] = {
    # decoder-only
    "gpt2": _GPT2,
    "gpt2-medium": {**_GPT2, "dim": 1024, "n_layers": 24, "n_heads": 16, "ffn_dim": 4096},
    "smollm2-135m": dict(
        family="decoder", vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
        context_length=8192, rope_theta=100_000.0, norm_eps=1e-5, tie_embeddings=True,
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=2,
    ),
    # Gemma 3: five sliding-window layers (512 positions, RoPE base 10k) to one global layer (1M),
    # q/k norms, a norm before and after each sublayer, RMSNorm weights as differences from 1.
    "gemma3-270m": dict(
        family="decoder", vocab_size=262144, dim=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256,
        ffn_dim=2048, context_length=32768, rope_theta=1_000_000.0, rope_local_theta=10_000.0,
        layer_types=("sliding",) * 5 + ("global",), sliding_window=512, norm_eps=1e-6, norm_weight_offset=1.0,
        sublayer_norms=True, qk_norm=True, activation="gelu_tanh", attention_scale=256**-0.5,
        embedding_scale=640**0.5, tie_embeddings=True, bos_token_id=2, eos_token_ids=(1,), pad_token_id=0,
    ),

    # Small enough to pretrain from scratch on a CPU in minutes (`attendo train`): about 4M
    # parameters with a 4096-token vocabulary, most of them in the embedding table.
    "llama-mini": dict(
        family="decoder", vocab_size=4096, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=688,
        context_length=256, tie_embeddings=True,
    ),
    "gpt2-mini": {**_GPT2, "vocab_size": 4096, "dim": 256, "n_layers": 4, "n_heads": 4, "ffn_dim": 1024,
                  "context_length": 256, "bos_token_id": None, "eos_token_ids": ()},
    "bloom-560m": dict(
        family="decoder", vocab_size=250880, dim=1024, n_layers=24, n_heads=16, ffn_dim=4096, context_length=2048,
        positions="alibi", norm="layernorm", embedding_norm=True, mlp_gated=False, activation="gelu_tanh",
        qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=3,
    ),
    # encoder-only
    "bert-base": _BERT,
    "all-minilm-l6-v2": {**_BERT, "dim": 384, "n_layers": 6, "ffn_dim": 1536, "lm_head": False},
    # encoder-decoder
    "t5-small": _T5,
    "flan-t5-small": {
        **_T5, "n_layers": 8, "n_decoder_layers": 8, "n_heads": 6, "ffn_dim": 1024, "mlp_gated": True,
        "activation": "gelu_tanh", "tie_embeddings": False, "logit_scale": 1.0,
    },
    "bart-base": _BART,
    "transformer-2017-base": _TRANSFORMER_2017,
    "transformer-2017-big": {
        **_TRANSFORMER_2017, "dim": 1024, "n_heads": 16, "ffn_dim": 4096, "embedding_scale": 1024**0.5,
    },
}  # fmt: skip

PRESETS: dict[str, ModelConfig] = {name: ModelConfig(**fields) for name, fields in _DECLARED.items()}


def byte_tokenizer() -> TextTokenizer:
    """A tokenizer with no training: ids 0-2 are <pad>, <s>, </s>, then one id per byte (259 in all).

    Any text round-trips; ids beyond the 259 (an untrained model may pick them) decode to nothing.
    """
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab |= {symbol: 3 + i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens(["<pad>", "<s>", "</s>"])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return TextTokenizer(tokenizer, bos_token="<s>", eos_token="</s>")


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset's ModelConfig, with fields replaced (e.g. n_layers=2)."""
    if name not in _DECLARED:
        raise ModelNotFoundError(f"no preset {name!r} (presets: {', '.join(_DECLARED)})")
    return ModelConfig(**{**_DECLARED[name], **overrides})


def build(name: str, *, seed: int | None = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> Model:
    """An untrained model of a preset architecture (overrides replace config fields), with
    randomly initialised weights (seeded) and the byte-level tokenizer."""
    config = preset(name, **overrides)
    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        network = build_network(config).to(dtype).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    defaults = {"eos_token_ids": list(config.eos_token_ids)}
    return make_model(network, byte_tokenizer(), defaults, Path(f"preset:{name}"))
