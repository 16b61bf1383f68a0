"""Declarative maps from checkpoint tensor names to attendo's parameter names.

A rule says which source tensors make one of our parameters and how they combine: our attention
has one fused q/k/v projection and our gated MLP one fused gate/up projection, so separate source
matrices are concatenated; GPT-2 stores its linear layers transposed (Conv1D). The loader applies
the rules to meta tensors first, which checks every name and shape before any data is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

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


def _llama_rules() -> dict[str, Rule]:
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


def _gpt2_rules() -> dict[str, Rule]:
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


NAME_MAPS: dict[str, Callable[[], dict[str, Rule]]] = {
    "llama": _llama_rules,
    "mistral": _llama_rules,
    "qwen2": _llama_rules,
    "gpt2": _gpt2_rules,
}

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
