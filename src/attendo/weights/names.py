"""Declarative maps from checkpoint tensor names to attendo's parameter names.

A rule says which source tensors make one of our parameters and how they combine: our attention
has one fused q/k/v projection and our gated MLP one fused gate/up projection, so separate source
matrices are concatenated; GPT-2 stores its linear layers transposed (Conv1D). The loader applies
the rules to empty stand-ins first, which checks every name and shape before any data is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from attendo.config import ModelConfig

Combine = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def only(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def concat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(tensors), dim=0)


def transposed(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return tensors[0].t()


@dataclass(frozen=True)
class Rule:
    sources: tuple[str, ...]  # source names; "{i}" stands for the layer index
    combine: Combine = only


def _rule(*sources: str, combine: Combine = only) -> Rule:
    return Rule(tuple(sources), combine)


def _llama_rules(config: ModelConfig | None = None) -> dict[str, Rule]:
    layer = "model.layers.{i}"
    attn = f"{layer}.self_attn"
    return {
        "embed.weight": _rule("model.embed_tokens.weight"),
        "blocks.{i}.attn_norm.weight": _rule(f"{layer}.input_layernorm.weight"),
        "blocks.{i}.attn.qkv.weight": _rule(*(f"{attn}.{p}_proj.weight" for p in "qkv"), combine=concat),
        "blocks.{i}.attn.qkv.bias": _rule(*(f"{attn}.{p}_proj.bias" for p in "qkv"), combine=concat),
        "blocks.{i}.attn.out.weight": _rule(f"{attn}.o_proj.weight"),
        "blocks.{i}.attn.out.bias": _rule(f"{attn}.o_proj.bias"),
        "blocks.{i}.mlp_norm.weight": _rule(f"{layer}.post_attention_layernorm.weight"),
        "blocks.{i}.mlp.up.weight": _rule(f"{layer}.mlp.gate_proj.weight", f"{layer}.mlp.up_proj.weight", combine=concat),
        "blocks.{i}.mlp.up.bias": _rule(f"{layer}.mlp.gate_proj.bias", f"{layer}.mlp.up_proj.bias", combine=concat),
        "blocks.{i}.mlp.down.weight": _rule(f"{layer}.mlp.down_proj.weight"),
        "blocks.{i}.mlp.down.bias": _rule(f"{layer}.mlp.down_proj.bias"),
        "norm.weight": _rule("model.norm.weight"),
        "lm_head.weight": _rule("lm_head.weight"),
    }


def _phi3_rules(config: ModelConfig | None = None) -> dict[str, Rule]:
    """LLaMA's names, with q/k/v and gate/up already fused as ours are."""
    layer = "model.layers.{i}"
    return {
        **_llama_rules(config),
        "blocks.{i}.attn.qkv.weight": _rule(f"{layer}.self_attn.qkv_proj.weight"),
        "blocks.{i}.mlp.up.weight": _rule(f"{layer}.mlp.gate_up_proj.weight"),
    }


def _qk_norm_rules(config: ModelConfig | None = None) -> dict[str, Rule]:
    """LLaMA's names plus an RMSNorm on every query and key head (Qwen3)."""
    attn = "model.layers.{i}.self_attn"
    return {
        **_llama_rules(config),
        "blocks.{i}.attn.q_norm.weight": _rule(f"{attn}.q_norm.weight"),
        "blocks.{i}.attn.k_norm.weight": _rule(f"{attn}.k_norm.weight"),
    }


def _gemma3_rules(config: ModelConfig | None = None) -> dict[str, Rule]:
    """Qwen3's names, but post_attention_layernorm is the norm after attention (LLaMA's before the
    MLP), plus the pre/post feed-forward norms."""
    layer = "model.layers.{i}"
    return {
        **_qk_norm_rules(config),
        "blocks.{i}.attn_post_norm.weight": _rule(f"{layer}.post_attention_layernorm.weight"),
        "blocks.{i}.mlp_norm.weight": _rule(f"{layer}.pre_feedforward_layernorm.weight"),
        "blocks.{i}.mlp_post_norm.weight": _rule(f"{layer}.post_feedforward_layernorm.weight"),
    }


def _gpt2_rules(config: ModelConfig | None = None) -> dict[str, Rule]:
    layer = "transformer.h.{i}"
    rules = {
        "embed.weight": _rule("transformer.wte.weight"),
        "pos_embed.weight": _rule("transformer.wpe.weight"),
        "blocks.{i}.attn.qkv.weight": _rule(f"{layer}.attn.c_attn.weight", combine=transposed),
        "blocks.{i}.attn.qkv.bias": _rule(f"{layer}.attn.c_attn.bias"),
        "blocks.{i}.attn.out.weight": _rule(f"{layer}.attn.c_proj.weight", combine=transposed),
        "blocks.{i}.attn.out.bias": _rule(f"{layer}.attn.c_proj.bias"),
        "blocks.{i}.mlp.up.weight": _rule(f"{layer}.mlp.c_fc.weight", combine=transposed),
        "blocks.{i}.mlp.up.bias": _rule(f"{layer}.mlp.c_fc.bias"),
        "blocks.{i}.mlp.down.weight": _rule(f"{layer}.mlp.c_proj.weight", combine=transposed),
        "blocks.{i}.mlp.down.bias": _rule(f"{layer}.mlp.c_proj.bias"),
        "lm_head.weight": _rule("lm_head.weight"),
    }
    for ours, theirs in (("blocks.{i}.attn_norm", f"{layer}.ln_1"), ("blocks.{i}.mlp_norm", f"{layer}.ln_2"), ("norm", "transformer.ln_f")):
        rules[f"{ours}.weight"] = _rule(f"{theirs}.weight")
        rules[f"{ours}.bias"] = _rule(f"{theirs}.bias")
    return rules


def _norm_rules(ours: str, theirs: str) -> dict[str, Rule]:
    """A LayerNorm's weight and bias (a bias rule is simply unused by an RMSNorm)."""
    return {f"{ours}.weight": _rule(f"{theirs}.weight"), f"{ours}.bias": _rule(f"{theirs}.bias")}


def _linear_rules(ours: str, *theirs: str) -> dict[str, Rule]:
    """A linear layer's weight and bias, concatenated from several source layers if given."""
    return {
        f"{ours}.weight": _rule(*(f"{t}.weight" for t in theirs), combine=concat),
        f"{ours}.bias": _rule(*(f"{t}.bias" for t in theirs), combine=concat),
    }


def per_head_qkv(tensors: Sequence[torch.Tensor], n_heads: int) -> torch.Tensor:
    """BLOOM's fused query_key_value rows are grouped per head, (heads, 3, head_dim); ours are
    [all queries; all keys; all values], (3, heads, head_dim). Works for the weight and the bias."""
    fused = tensors[0]
    rest = fused.shape[1:]
    return fused.reshape(n_heads, 3, -1, *rest).transpose(0, 1).reshape(fused.shape)


def _bloom_rules(config: ModelConfig) -> dict[str, Rule]:
    layer = "transformer.h.{i}"
    qkv = partial(per_head_qkv, n_heads=config.n_heads)
    return {
        "embed.weight": _rule("transformer.word_embeddings.weight"),
        **_norm_rules("embed_norm", "transformer.word_embeddings_layernorm"),
        **_norm_rules("blocks.{i}.attn_norm", f"{layer}.input_layernorm"),
        "blocks.{i}.attn.qkv.weight": _rule(f"{layer}.self_attention.query_key_value.weight", combine=qkv),
        "blocks.{i}.attn.qkv.bias": _rule(f"{layer}.self_attention.query_key_value.bias", combine=qkv),
        **_linear_rules("blocks.{i}.attn.out", f"{layer}.self_attention.dense"),
        **_norm_rules("blocks.{i}.mlp_norm", f"{layer}.post_attention_layernorm"),
        **_linear_rules("blocks.{i}.mlp.up", f"{layer}.mlp.dense_h_to_4h"),
        **_linear_rules("blocks.{i}.mlp.down", f"{layer}.mlp.dense_4h_to_h"),
        **_norm_rules("norm", "transformer.ln_f"),
        "lm_head.weight": _rule("lm_head.weight"),
    }


def _bert_rules(config: ModelConfig) -> dict[str, Rule]:
    # Written with the "bert." prefix of BertForMaskedLM; checkpoint_rules drops it for a bare
    # BertModel (sentence-transformers checkpoints).
    layer = "bert.encoder.layer.{i}"
    return {
        "embed.weight": _rule("bert.embeddings.word_embeddings.weight"),
        "type_embed.weight": _rule("bert.embeddings.token_type_embeddings.weight"),
        "encoder.pos_embed.weight": _rule("bert.embeddings.position_embeddings.weight"),
        **_norm_rules("encoder.embed_norm", "bert.embeddings.LayerNorm"),
        **_linear_rules("encoder.blocks.{i}.attn.qkv", *(f"{layer}.attention.self.{p}" for p in ("query", "key", "value"))),
        **_linear_rules("encoder.blocks.{i}.attn.out", f"{layer}.attention.output.dense"),
        **_norm_rules("encoder.blocks.{i}.attn_norm", f"{layer}.attention.output.LayerNorm"),
        **_linear_rules("encoder.blocks.{i}.mlp.up", f"{layer}.intermediate.dense"),
        **_linear_rules("encoder.blocks.{i}.mlp.down", f"{layer}.output.dense"),
        **_norm_rules("encoder.blocks.{i}.mlp_norm", f"{layer}.output.LayerNorm"),
        **_linear_rules("head_transform.dense", "cls.predictions.transform.dense"),
        **_norm_rules("head_transform.norm", "cls.predictions.transform.LayerNorm"),
        "lm_head.weight": _rule("cls.predictions.decoder.weight"),
        "lm_head.bias": _rule("cls.predictions.bias"),
    }


def _t5_rules(config: ModelConfig) -> dict[str, Rule]:
    rules = {"embed.weight": _rule("shared.weight"), "lm_head.weight": _rule("lm_head.weight")}
    for stack in ("encoder", "decoder"):
        layer = f"{stack}.block.{{i}}.layer"
        ours = f"{stack}.blocks.{{i}}"
        mlp = f"{layer}.{2 if stack == 'decoder' else 1}"  # the decoder's layer.1 is cross-attention
        up = ("wi_0", "wi_1") if config.mlp_gated else ("wi",)  # gate rows first, as ours
        rules |= {
            f"{stack}.relative_bias.weight": _rule(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            f"{ours}.attn_norm.weight": _rule(f"{layer}.0.layer_norm.weight"),
            f"{ours}.attn.qkv.weight": _rule(*(f"{layer}.0.SelfAttention.{p}.weight" for p in "qkv"), combine=concat),
            f"{ours}.attn.out.weight": _rule(f"{layer}.0.SelfAttention.o.weight"),
            f"{ours}.cross_norm.weight": _rule(f"{layer}.1.layer_norm.weight"),
            f"{ours}.cross.q.weight": _rule(f"{layer}.1.EncDecAttention.q.weight"),
            f"{ours}.cross.kv.weight": _rule(*(f"{layer}.1.EncDecAttention.{p}.weight" for p in "kv"), combine=concat),
            f"{ours}.cross.out.weight": _rule(f"{layer}.1.EncDecAttention.o.weight"),
            f"{ours}.mlp_norm.weight": _rule(f"{mlp}.layer_norm.weight"),
            f"{ours}.mlp.up.weight": _rule(*(f"{mlp}.DenseReluDense.{p}.weight" for p in up), combine=concat),
            f"{ours}.mlp.down.weight": _rule(f"{mlp}.DenseReluDense.wo.weight"),
            f"{stack}.norm.weight": _rule(f"{stack}.final_layer_norm.weight"),
        }
    return rules


def _row(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return tensors[0].reshape(-1)  # BART keeps its logit bias as a (1, vocab) buffer


def _bart_rules(config: ModelConfig) -> dict[str, Rule]:
    rules = {
        "embed.weight": _rule("model.shared.weight"),
        "lm_head.weight": _rule("lm_head.weight"),
        "lm_head.bias": _rule("final_logits_bias", combine=_row),
    }
    for stack in ("encoder", "decoder"):
        layer = f"model.{stack}.layers.{{i}}"
        ours = f"{stack}.blocks.{{i}}"
        rules |= {
            f"{stack}.pos_embed.weight": _rule(f"model.{stack}.embed_positions.weight"),
            **_norm_rules(f"{stack}.embed_norm", f"model.{stack}.layernorm_embedding"),
            **_linear_rules(f"{ours}.attn.qkv", *(f"{layer}.self_attn.{p}_proj" for p in "qkv")),
            **_linear_rules(f"{ours}.attn.out", f"{layer}.self_attn.out_proj"),
            **_norm_rules(f"{ours}.attn_norm", f"{layer}.self_attn_layer_norm"),
            **_linear_rules(f"{ours}.cross.q", f"{layer}.encoder_attn.q_proj"),
            **_linear_rules(f"{ours}.cross.kv", f"{layer}.encoder_attn.k_proj", f"{layer}.encoder_attn.v_proj"),
            **_linear_rules(f"{ours}.cross.out", f"{layer}.encoder_attn.out_proj"),
            **_norm_rules(f"{ours}.cross_norm", f"{layer}.encoder_attn_layer_norm"),
            **_linear_rules(f"{ours}.mlp.up", f"{layer}.fc1"),
            **_linear_rules(f"{ours}.mlp.down", f"{layer}.fc2"),
            **_norm_rules(f"{ours}.mlp_norm", f"{layer}.final_layer_norm"),
        }
    return rules


NAME_MAPS: dict[str, Callable[[ModelConfig], dict[str, Rule]]] = {
    "llama": _llama_rules,
    "mistral": _llama_rules,
    "qwen2": _llama_rules,
    "phi3": _phi3_rules,
    "qwen3": _qk_norm_rules,
    "gemma3_text": _gemma3_rules,
    "gpt2": _gpt2_rules,
    "bloom": _bloom_rules,
    "bert": _bert_rules,
    "t5": _t5_rules,
    "bart": _bart_rules,
}

# Hugging Face's base_model_prefix: a checkpoint saved from the model with its task head names
# the body "bert.…", one saved from the bare model does not.
BASE_PREFIXES = {"bert": "bert."}
# A tensor only a checkpoint with the (optional) LM head has; without it the network is built
# headless. A sentence-transformers BERT has no masked-LM head.
HEAD_PROBES = {"bert": "cls.predictions.transform.dense.weight"}


def checkpoint_rules(model_type: str, config: ModelConfig, available: Collection[str]) -> dict[str, Rule]:
    """The name map for one checkpoint: the model type's rules, with the base-model prefix
    removed when the checkpoint was saved without it."""
    rules = NAME_MAPS[model_type](config)
    prefix = BASE_PREFIXES.get(model_type)
    if prefix and not any(name.startswith(prefix) for name in available):
        rules = {ours: Rule(tuple(s.removeprefix(prefix) for s in r.sources), r.combine) for ours, r in rules.items()}
    return rules


def fit_head(config: ModelConfig, model_type: str, rules: dict[str, Rule], available: Collection[str]) -> ModelConfig:
    """Shape the output head after what the checkpoint holds: none when the optional head's
    tensors are absent; untied when the config says tied but the checkpoint stores its own head
    (T5 v1.1 saved by transformers 5 keeps a separate lm_head under tie_word_embeddings=true)."""
    probe = HEAD_PROBES.get(model_type)
    if probe is not None and probe not in available:
        return config.replace(lm_head=False)
    head = rules.get("lm_head.weight")
    if config.tie_embeddings and head is not None and all(s in available for s in head.sources):
        return config.replace(tie_embeddings=False)
    return config

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def rule_for(rules: dict[str, Rule], parameter: str) -> tuple[Rule, tuple[str, ...]] | None:
    """The rule for one of our parameter names and its source names with the layer filled in."""
    match = _LAYER_INDEX.search(parameter)
    pattern = _LAYER_INDEX.sub(".{i}.", parameter, count=1) if match else parameter
    rule = rules.get(pattern)
    if rule is None:
        return None
    layer = match.group(1) if match else ""
    return rule, tuple(source.replace("{i}", layer) for source in rule.sources)


@dataclass(frozen=True)
class CheckpointNames:
    """How a loaded model's parameters were made from its checkpoint: the checkpoint's
    model_type, the rules, and every tensor's shape in the file (Hugging Face layout). The Model
    keeps it, so that LoRA adapters can name our fused layers' parts as the checkpoint does."""

    model_type: str
    rules: dict[str, Rule]
    shapes: dict[str, tuple[int, ...]]
