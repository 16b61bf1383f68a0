"""A model's vital statistics, as `attendo info` prints them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from attendo.model import Model
from attendo.optimize import BlockLinear, HalfLinear


def _weights(model: Model) -> Iterator[tuple[int, str]]:
    """(number of values, dtype as stored) of every weight tensor; tied weights count once.
    The speed-up passes keep their weights in buffers, so those are counted from the layers."""
    for p in model.network.parameters():
        yield p.numel(), str(p.dtype).removeprefix("torch.")
    for module in model.network.modules():
        if isinstance(module, BlockLinear):
            yield module.out_features * module.in_features, module.qtype.name.lower()
        elif isinstance(module, HalfLinear):
            yield module.weight.numel(), str(module.weight.dtype).removeprefix("torch.")


def parameter_count(model: Model) -> int:
    return sum(n for n, _ in _weights(model))


def describe(model: Model) -> dict[str, Any]:
    c = model.config
    dtypes = Counter(dtype for _, dtype in _weights(model))
    attention = "multi-head" if c.n_kv_heads == c.n_heads else f"grouped-query ({c.n_heads // c.n_kv_heads} queries per key/value head)"
    if c.has_sliding_layers:
        kinds = [c.layer_type(i) for i in range(c.n_layers)]
        attention += f"; {kinds.count('sliding')} layers see the last {c.sliding_window} positions, {kinds.count('global')} see all"
    if c.qk_norm:
        attention += "; q/k norms"
    positions = c.positions
    if c.positions == "rope":
        positions += f" (theta {c.rope_theta:g}" + (f", sliding layers {c.rope_local_theta:g}" if c.rope_local_theta else "")
        positions += (", scaled" if c.rope_frequency_factors else "") + (f", {c.rope_dims} of {c.head_dim} dims" if c.rope_dims != c.head_dim else "") + ")"
    norm = f"{c.norm}, eps {c.norm_eps:g}, " + ("pre-norm" if c.pre_norm else "post-norm")
    if c.sublayer_norms:
        norm += " and after each sublayer"
    mlp = ("gated " if c.mlp_gated else "") + c.activation
    return {
        "family": c.family,
        "source": str(model.source),
        "parameters": f"{parameter_count(model):,}",
        "layers": c.n_layers if c.family != "encoder-decoder" else f"{c.n_layers} encoder + {c.decoder_layers} decoder",
        "model dim": c.dim,
        "heads": f"{c.n_heads} query, {c.n_kv_heads} key/value, head dim {c.head_dim}",
        "attention": attention,
        "feed-forward": f"{mlp}, hidden dim {c.ffn_dim}",
        "positions": positions,
        "norm": norm,
        "vocabulary": c.vocab_size,
        "context window": c.context_length,
        "tied embeddings": c.tie_embeddings,
        "weights in memory": ", ".join(f"{n} tensor{'s' * (n != 1)} {d}" for d, n in dtypes.most_common()),
        "stop token ids": model.eos_token_ids,
        "chat template": "yes" if model.tokenizer.chat_template else "no",
    }
