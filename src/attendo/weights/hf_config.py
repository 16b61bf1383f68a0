"""Build a ModelConfig from a Hugging Face ``config.json``: the one place that knows its keys.

Each supported ``model_type`` has an adapter; the model code itself never sees these names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attendo.config import Activation, ModelConfig
from attendo.errors import UnsupportedModelError

_ACTIVATIONS: dict[str, Activation] = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}


def activation(name: str) -> Activation:
    if name not in _ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r} is not supported (known: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[name]


def token_ids(value: Any) -> tuple[int, ...]:
    """A config's token id field, which may be absent, an int, or a list."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _rope_theta(hf: dict[str, Any]) -> float:
    # transformers 5 moved rope settings into "rope_parameters".
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        raise UnsupportedModelError(f"RoPE scaling {kind!r} is not supported yet")
    return float(hf.get("rope_theta") or rope.get("rope_theta") or 10_000.0)


def _llama(hf: dict[str, Any]) -> ModelConfig:
    heads, dim = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or dim // heads
    context = hf.get("max_position_embeddings", 2048)
    # Mistral's sliding window equals full attention up to the window's length: stop there
    # rather than attend wrongly beyond it.
    if hf.get("sliding_window") and hf.get("use_sliding_window", True):
        context = min(context, hf["sliding_window"])
    qkv_bias = bool(hf.get("attention_bias", False)) or hf.get("model_type") == "qwen2"
    return ModelConfig(
        family="decoder",
        vocab_size=hf["vocab_size"],
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        ffn_dim=hf["intermediate_size"],
        context_length=context,
        positions="rope",
        rope_theta=_rope_theta(hf),
        rope_dims=int(head_dim * hf.get("partial_rotary_factor", 1.0)),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp_gated=True,
        activation=activation(hf.get("hidden_act", "silu")),
        qkv_bias=qkv_bias,
        out_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=token_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )


def _gpt2(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise UnsupportedModelError("GPT-2 variants with layer-scaled attention are not supported")
    dim = hf["n_embd"]
    return ModelConfig(
        family="decoder",
        vocab_size=hf["vocab_size"],
        dim=dim,
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        ffn_dim=hf.get("n_inner") or 4 * dim,
        context_length=hf["n_positions"],
        positions="learned",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp_gated=False,
        activation=activation(hf.get("activation_function", "gelu_new")),
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        attention_scale=None if hf.get("scale_attn_weights", True) else 1.0,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=token_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )


def _bloom(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("apply_residual_connection_post_layernorm"):
        raise UnsupportedModelError("BLOOM with apply_residual_connection_post_layernorm is not supported")
    dim = hf.get("hidden_size") or hf["n_embed"]
    return ModelConfig(
        family="decoder",
        vocab_size=hf["vocab_size"],
        dim=dim,
        n_layers=hf.get("n_layer") or hf["num_hidden_layers"],
        n_heads=hf.get("n_head") or hf["num_attention_heads"],
        ffn_dim=4 * dim,
        context_length=hf.get("seq_length") or 2048,  # ALiBi has no table; this bounds the KV cache
        positions="alibi",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        embedding_norm=True,
        mlp_gated=False,
        activation="gelu_tanh",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=token_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )


def _bert(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(f"BERT with {hf['position_embedding_type']} positions is not supported")
    return ModelConfig(
        family="encoder",
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"],
        context_length=hf.get("max_position_embeddings", 512),
        positions="learned",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        pre_norm=False,
        embedding_norm=True,
        final_norm=False,
        mlp_gated=False,
        activation=activation(hf.get("hidden_act", "gelu")),
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        token_types=hf.get("type_vocab_size", 2),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        head_transform=True,
        head_bias=True,
        pad_token_id=hf.get("pad_token_id"),
    )


def _t5(hf: dict[str, Any]) -> ModelConfig:
    projection = hf.get("feed_forward_proj", "relu")  # "relu" (T5 v1.0) or "gated-gelu" (v1.1, FLAN-T5)
    gated = projection.startswith("gated-")
    act = "gelu_new" if projection == "gated-gelu" else projection.removeprefix("gated-")  # as transformers
    tied = hf.get("tie_word_embeddings", True) is not False
    # T5 v1.0 scales the decoder output by d_model**-0.5 before its (tied) head; v1.1 does not.
    # transformers 5 records this as scale_decoder_outputs; older configs by untying the head.
    scale = hf.get("scale_decoder_outputs", tied)
    dim = hf["d_model"]
    pad = hf.get("pad_token_id", 0)
    return ModelConfig(
        family="encoder-decoder",
        vocab_size=hf["vocab_size"],
        dim=dim,
        n_layers=hf["num_layers"],
        n_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        n_heads=hf["num_heads"],
        head_dim=hf["d_kv"],
        ffn_dim=hf["d_ff"],
        context_length=hf.get("n_positions") or 512,
        positions="relative",
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        norm="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        mlp_gated=gated,
        activation=activation(act),
        attention_scale=1.0,  # T5 folds 1/sqrt(d) into its initialisation instead
        tie_embeddings=tied,
        logit_scale=dim**-0.5 if scale else 1.0,
        pad_token_id=pad,
        eos_token_ids=token_ids(hf.get("eos_token_id", 1)),
        decoder_start_token_id=hf.get("decoder_start_token_id", pad),
    )


def _bart(hf: dict[str, Any]) -> ModelConfig:
    for encoder_key, decoder_key in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if hf.get(encoder_key) != hf.get(decoder_key):
            raise UnsupportedModelError(f"BART with {encoder_key} != {decoder_key} is not supported")
    dim = hf["d_model"]
    return ModelConfig(
        family="encoder-decoder",
        vocab_size=hf["vocab_size"],
        dim=dim,
        n_layers=hf["encoder_layers"],
        n_decoder_layers=hf["decoder_layers"],
        n_heads=hf["encoder_attention_heads"],
        ffn_dim=hf["encoder_ffn_dim"],
        context_length=hf["max_position_embeddings"],
        positions="learned",
        position_offset=2,  # BART's position table starts with two unused rows
        norm="layernorm",
        norm_eps=1e-5,
        pre_norm=False,
        embedding_norm=True,
        final_norm=False,
        mlp_gated=False,
        activation=activation(hf.get("activation_function", "gelu")),
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        embedding_scale=dim**0.5 if hf.get("scale_embedding") else 1.0,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        head_bias=True,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=token_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        decoder_start_token_id=hf.get("decoder_start_token_id"),
    )


ADAPTERS: dict[str, Callable[[dict[str, Any]], ModelConfig]] = {
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _llama,
    "gpt2": _gpt2,
    "bloom": _bloom,
    "bert": _bert,
    "t5": _t5,
    "bart": _bart,
}


def config_from_hf(hf: dict[str, Any], source: object) -> ModelConfig:
    model_type = hf.get("model_type")
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise UnsupportedModelError(
            f"{source}: architecture {model_type!r} is not supported (supported: {', '.join(sorted(ADAPTERS))})"
        )
    try:
        return adapter(hf)
    except KeyError as e:
        raise UnsupportedModelError(f"{source}: config.json lacks {e.args[0]!r} for a {model_type} model") from None
    except (ValueError, UnsupportedModelError) as e:
        raise UnsupportedModelError(f"{source}: {e}") from None
