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


ADAPTERS: dict[str, Callable[[dict[str, Any]], ModelConfig]] = {
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _llama,
    "gpt2": _gpt2,
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
