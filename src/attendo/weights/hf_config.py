"""Build a ModelConfig from a Hugging Face ``config.json``: the one place that knows its keys.

Each supported ``model_type`` has an adapter; the model code itself never sees these names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from attendo.config import Activation, LayerType, ModelConfig
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


def _rope(hf: dict[str, Any], params: dict[str, Any], head_dim: int, context: int) -> dict[str, Any]:
    """The RoPE fields of a ModelConfig (and the context length they allow) from one RoPE
    description: transformers 5's rope_parameters, or the rope_theta and rope_scaling of older
    configs. Scaled RoPE becomes a divisor per rotary frequency."""
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10_000.0)
    rope_dims = int(head_dim * (params.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0))
    fields: dict[str, Any] = {"rope_theta": theta, "rope_dims": rope_dims, "context_length": context}
    kind = params.get("rope_type", params.get("type")) or "default"
    frequencies = [theta ** (-i / rope_dims) for i in range(0, rope_dims - 1, 2)]
    if kind == "default":
        return fields
    if kind == "frequency_factors":  # attendo's own: the divisors as a GGUF file stores them
        factors = [float(f) for f in params["factors"]]
        fields["rope_attention_factor"] = float(params.get("attention_factor") or 1.0)
        fields["context_length"] = min(context, params.get("original_max_position_embeddings") or context)
    elif kind == "linear":  # positions squeezed by the factor: every frequency divided by it
        factors = [float(params["factor"])] * len(frequencies)
    elif kind == "llama3":
        factors = _llama3_factors(frequencies, params)
    elif kind == "longrope":
        # Phi-3's short factors hold up to the original context length; longer sequences switch
        # to the long factors. attendo stays within the original length, where one set is exact.
        original = params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") or context
        factors = [float(f) for f in params["short_factor"]]
        scale = params.get("factor") or context / original
        fields["rope_attention_factor"] = params.get("attention_factor") or (
            math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
        )
        fields["context_length"] = min(context, original)
    else:
        raise UnsupportedModelError(f"RoPE scaling {kind!r} is not supported (supported: linear, llama3, longrope)")
    fields["rope_frequency_factors"] = tuple(factors)
    return fields


def _llama3_factors(frequencies: list[float], params: dict[str, Any]) -> list[float]:
    """Llama 3.1's scaling: frequencies whose wavelength exceeds the original context / low_freq_factor
    are divided by the factor, those shorter than original / high_freq_factor are kept, and the
    ones between are blended smoothly."""
    factor, low, high = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
    original = params["original_max_position_embeddings"]
    factors = []
    for frequency in frequencies:
        wavelength = 2 * math.pi / frequency
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


_LAYER_TYPES: dict[str, LayerType] = {"full_attention": "global", "sliding_attention": "sliding"}


def _attention_layers(hf: dict[str, Any]) -> dict[str, Any]:
    """layer_types and sliding_window: the config's own per-layer list, or (Mistral, Phi-3) every
    layer sliding when a window is set and in use."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if hf.get("layer_types"):
        unknown = sorted(set(hf["layer_types"]) - set(_LAYER_TYPES))
        if unknown:
            raise UnsupportedModelError(f"attention layer type {unknown[0]!r} is not supported")
        types = tuple(_LAYER_TYPES[t] for t in hf["layer_types"])
        return {"layer_types": types, "sliding_window": window if "sliding" in types else None}
    return {"layer_types": ("sliding",), "sliding_window": window} if window else {}


def _rotary_decoder(hf: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """The fields every LLaMA-like config (LLaMA, Mistral, Qwen2, Phi-3, Gemma 3) spells alike."""
    heads = hf["num_attention_heads"]
    return dict(
        family="decoder",
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        ffn_dim=hf["intermediate_size"],
        positions="rope",
        norm="rmsnorm",
        mlp_gated=True,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=token_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )


def _llama(hf: dict[str, Any]) -> ModelConfig:
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    qkv_bias = bool(hf.get("attention_bias", False)) or hf.get("model_type") == "qwen2"
    return ModelConfig(
        **_rotary_decoder(hf, head_dim),
        **_rope(hf, rope, head_dim, hf.get("max_position_embeddings", 2048)),
        **_attention_layers(hf),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=activation(hf.get("hidden_act", "silu")),
        qkv_bias=qkv_bias,
        out_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _qwen3(hf: dict[str, Any]) -> ModelConfig:
    """Qwen2's layout without the q/k/v biases, with an RMSNorm on every query and key head."""
    return _llama(hf).replace(qk_norm=True)


def _gemma3(hf: dict[str, Any]) -> ModelConfig:
    """Gemma 3's text model: five sliding-window layers to one global, each kind with its own RoPE
    base (only the global one scaled), q/k norms, norms around each sublayer, RMSNorm weights
    stored as differences from 1, embeddings scaled by sqrt(dim), GELU-tanh gated MLP."""
    if hf.get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError("attn_logit_softcapping (soft-capped attention scores) is not supported")
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError("use_bidirectional_attention (Gemma 3 as an encoder) is not supported")
    dim, head_dim = hf["hidden_size"], hf.get("head_dim", 256)
    context = hf.get("max_position_embeddings", 131_072)
    rope = hf.get("rope_parameters") or {}
    # transformers 5 keeps each layer kind's RoPE apart; older configs spell the global one as
    # rope_theta and rope_scaling, and the local base as rope_local_base_freq.
    global_rope = rope.get("full_attention") or {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 1e6)}
    local_rope = rope.get("sliding_attention") or {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    if local_rope.get("rope_type", "default") != "default":
        raise UnsupportedModelError(f"scaled RoPE ({local_rope['rope_type']}) on sliding-window layers is not supported")
    pattern = hf.get("sliding_window_pattern", 6)  # layer_types' predecessor: every 6th layer global
    layers = hf.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(pattern)]
    return ModelConfig(
        **_rotary_decoder(hf, head_dim),
        **_rope(hf, global_rope, head_dim, context),
        rope_local_theta=float(local_rope.get("rope_theta", 10_000.0)),
        **_attention_layers({"layer_types": layers, "sliding_window": hf.get("sliding_window", 4096)}),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        norm_weight_offset=1.0,
        sublayer_norms=True,
        qk_norm=True,
        activation=activation(hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"),
        qkv_bias=bool(hf.get("attention_bias", False)),
        out_bias=bool(hf.get("attention_bias", False)),
        attention_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        embedding_scale=dim**0.5,
        final_logit_softcap=hf.get("final_logit_softcapping"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
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
    "phi3": _llama,
    "qwen3": _qwen3,
    "gemma3_text": _gemma3,
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
