"""Attention maps of one layer for a text, in all three families.

The weights come from the model's explicit attention path (`Model.attention_maps`, which the
parity tests check against transformers), recording only the asked-for layer so a long text holds
one layer's weights:

- decoder-only: "self", causal (queries and keys are the text's tokens);
- encoder-only: "self", bidirectional;
- encoder-decoder: "encoder" (input over input), "decoder" (target over target so far) and
  "cross" (target over input); the target is the decoder's start token and then the target text.

Results go to the server's `/v1/inspect/attention` and to `attendo attention`'s heatmaps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from attendo.errors import InvalidSettingError
from attendo.inspect.stages import check_token_ids
from attendo.inspect.tokens import readable_tokens

if TYPE_CHECKING:
    from attendo.model import Model

MAX_ATTENTION_TOKENS = 512  # text + target: beyond it a map is unreadable and its weights large
DECIMALS = 4

# Which token list each kind's queries and keys are.
KIND_AXES = {
    "self": ("tokens", "tokens"),
    "encoder": ("tokens", "tokens"),
    "decoder": ("target_tokens", "target_tokens"),
    "cross": ("target_tokens", "tokens"),
}


class TooManyTokensError(InvalidSettingError):
    """More tokens than an attention map is drawn for."""


@dataclass(frozen=True)
class LayerAttention:
    """One layer's attention weights: kinds[kind] is (heads, queries, keys)."""

    family: str
    layers: int  # the depth of the deepest stack
    heads: int
    layer: int
    tokens: list[int]
    target_tokens: list[int] | None
    kinds: dict[str, torch.Tensor]

    def to_dict(self, labels: list[str], target_labels: list[str] | None) -> dict[str, Any]:
        """The JSON shape of /v1/inspect/attention (weights rounded to 4 decimals)."""
        result: dict[str, Any] = {
            "family": self.family, "layers": self.layers, "heads": self.heads, "layer": self.layer,
            "tokens": [{"id": i, "token": t} for i, t in zip(self.tokens, labels)],
        }  # fmt: skip
        if self.target_tokens is not None and target_labels is not None:
            result["target_tokens"] = [{"id": i, "token": t} for i, t in zip(self.target_tokens, target_labels)]
        result["kinds"] = {
            kind: {
                "queries": KIND_AXES[kind][0],
                "keys": KIND_AXES[kind][1],
                "heads": _rounded(weights),
                "average": _rounded(weights.mean(dim=0)),
            }
            for kind, weights in self.kinds.items()
        }
        return result


def _rounded(weights: torch.Tensor) -> list:
    # float64 before rounding, so each number prints as its 4 decimals (float32 would not)
    return weights.double().round(decimals=DECIMALS).tolist()


def depth(model: Model) -> int:
    c = model.config
    return max(c.n_layers, c.decoder_layers) if c.family == "encoder-decoder" else c.n_layers


def resolve_layer(model: Model, layer: int) -> int:
    """A layer index; negative counts from the last (-1 is the last layer)."""
    layers = depth(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not -layers <= layer < layers:
        raise InvalidSettingError(f"layer must be an integer from 0 to {layers - 1} (or -1 for the last), got {layer!r}")
    return layer % layers


def attention_inputs(model: Model, text: str | None = None, token_ids: list[int] | None = None,
                     target: str | None = None) -> tuple[list[int], list[int] | None]:
    """The token ids attention is computed over: the text's (with the tokenizer's special
    tokens) or the ids given; and for an encoder-decoder the decoder's, start token first."""
    if (text is None) == (token_ids is None):
        raise InvalidSettingError("give exactly one of a text and token ids")
    if text is not None and not text.strip():
        raise InvalidSettingError("the text is empty")
    ids = model.tokenizer.encode(text) if text is not None else [int(i) for i in token_ids or []]
    c = model.config
    target_ids = None
    if c.family == "encoder-decoder":
        target_ids = [model.decoder_start_token_id]  # type: ignore[attr-defined]
        if target:
            target_ids += model.tokenizer.encode(target, add_special_tokens=False)
    elif target is not None:
        raise InvalidSettingError(f"a target text is for encoder-decoder models; {model.source.name} is {c.family}-only")
    total = len(ids) + len(target_ids or [])
    if total > MAX_ATTENTION_TOKENS:
        raise TooManyTokensError(
            f"attention maps are drawn for at most {MAX_ATTENTION_TOKENS} tokens (text and target together), got {total}"
        )
    check_token_ids(ids, c.vocab_size, c.context_length)
    return ids, target_ids


def layer_attention(model: Model, token_ids: list[int], target_ids: list[int] | None, layer: int) -> LayerAttention:
    """The attention weights of `layer` for the ids attention_inputs gave."""
    layer = resolve_layer(model, layer)
    c = model.config
    if c.family == "encoder-decoder":
        maps = model.attention_maps([token_ids], decoder_token_ids=[target_ids], layer=layer)  # type: ignore[call-arg]
        kinds = {kind: weights[0, 0] for kind, weights in maps.items()}
    else:
        kinds = {"self": model.attention_maps([token_ids], layer=layer)[0, 0]}
    return LayerAttention(c.family, depth(model), c.n_heads, layer, token_ids, target_ids, kinds)


def attention_json(model: Model, view: LayerAttention) -> dict[str, Any]:
    tokenizer = model.tokenizer
    targets = None if view.target_tokens is None else readable_tokens(tokenizer, view.target_tokens)
    return view.to_dict(readable_tokens(tokenizer, view.tokens), targets)
