"""The path a text takes through one model, stage by stage, with that model's numbers.

tokenizer → embedding (+ positions) → N × (attention, feed-forward) → norm → LM head → softmax,
read from the model's ModelConfig alone (no forward pass): what the playground's Model view draws
and `/v1/inspect/model` returns next to what `attendo info` prints. An encoder-decoder has two
stacks, the decoder's with cross-attention; an encoder-only model ends in its pooling (sentence
embeddings) and, when it has one, a masked-language-model head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attendo.inspect.tokens import token_labels

if TYPE_CHECKING:
    from attendo.config import ModelConfig
    from attendo.model import Model


def _positions(c: ModelConfig) -> dict[str, Any]:
    stage: dict[str, Any] = {"stage": "positions", "kind": c.positions, "context": c.context_length}
    if c.positions == "rope":
        stage |= {"theta": c.rope_theta, "rotated_dims": c.rope_dims, "where": "queries and keys, in every layer"}
    elif c.positions in ("alibi", "relative"):
        stage["where"] = "a bias on the attention scores, in every layer"
        if c.positions == "relative":
            stage |= {"buckets": c.relative_buckets, "max_distance": c.relative_max_distance}
    else:
        stage["where"] = "added to the token embeddings"
    return stage


def _blocks(c: ModelConfig, stack: str, count: int, causal: bool, cross: bool) -> dict[str, Any]:
    attention = {"heads": c.n_heads, "kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "dim": c.dim, "causal": causal}
    stage: dict[str, Any] = {
        "stage": "blocks", "stack": stack, "count": count,
        "norm": {"kind": c.norm, "placement": "pre" if c.pre_norm else "post"},
        "attention": attention,
    }  # fmt: skip
    if cross:
        stage["cross_attention"] = {"heads": c.n_heads, "head_dim": c.head_dim, "keys": "the encoder output"}
    stage["feed_forward"] = {"dim": c.dim, "hidden_dim": c.ffn_dim, "activation": c.activation, "gated": c.mlp_gated}
    return stage


def data_path(model: Model) -> list[dict[str, Any]]:
    c = model.config
    labels = token_labels(model.tokenizer)
    path: list[dict[str, Any]] = [
        {"stage": "tokenizer", "kind": labels.kind, "vocabulary": model.tokenizer.vocab_size},
        {"stage": "embedding", "vocabulary": c.vocab_size, "dim": c.dim, "scale": c.embedding_scale,
         "segment_types": c.token_types, "norm": c.embedding_norm},
        _positions(c),
    ]  # fmt: skip
    if c.family == "encoder-decoder":
        path.append(_blocks(c, "encoder", c.n_layers, causal=False, cross=False))
        path.append(_blocks(c, "decoder", c.decoder_layers, causal=True, cross=True))
    else:
        path.append(_blocks(c, c.family, c.n_layers, causal=c.causal, cross=False))
    if c.final_norm:
        path.append({"stage": "norm", "kind": c.norm})
    pooling = getattr(model, "pooling", None)
    if c.family == "encoder" and pooling is not None:
        path.append({"stage": "pooling", "mode": pooling.mode, "normalize": pooling.normalize, "dim": c.dim})
    if c.lm_head:
        path.append({"stage": "lm_head", "shape": [c.dim, c.vocab_size], "tied": c.tie_embeddings,
                     "task": "masked tokens" if c.family == "encoder" else "next token"})  # fmt: skip
        path.append({"stage": "softmax", "vocabulary": c.vocab_size})
    return path
