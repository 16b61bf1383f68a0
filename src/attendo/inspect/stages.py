"""The next-token distribution of one generation step, stage by stage.

Input: the step's logits (vocab,) and the sampling settings. The sampler's own `sampling_stages`
gives every stage's logits (raw → penalties → [grammar] → temperature → top-k → top-p → min-p →
final); nothing here re-implements a stage. Each stage is summarised as what the sampling-stages
view, `attendo distribution` and `/v1/inspect/stages` show:

- `tokens`: the most probable tokens after the stage, with their probability `p`;
- `kept`: how many tokens the stage left in play (finite logit: a token with p > 0, up to float
  underflow at very low temperatures);
- `mass`: the share of the previous stage's probability on the tokens this stage kept (1 when it
  removed nothing; penalties and temperature reshape without removing);
- `entropy`: of the stage's distribution, in bits;
- `threshold`: the lowest probability, at the stage's input, of a token the stage kept, when it
  removed any: everything below it was dropped (the cut-off line of the view), else None.

The chosen token is the one given (the token a generation took at that step), or what
`next_token` picks: the argmax for greedy settings, else a draw with the given generator, which is
what `model.generate` draws at its first step with the same seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from attendo.errors import ContextLengthError, InvalidSettingError, UnsupportedModelError
from attendo.generation.sampler import SamplingSettings, make_generator, next_token, sampling_stages
from attendo.inspect.tokens import token_labels

if TYPE_CHECKING:
    from attendo.model import Model

MAX_TOP = 200  # tokens listed per stage


@dataclass(frozen=True)
class TokenProbability:
    id: int
    token: str
    p: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "token": self.token, "p": self.p}


@dataclass(frozen=True)
class StageSummary:
    name: str
    tokens: list[TokenProbability]
    kept: int
    mass: float
    entropy: float  # bits
    threshold: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "tokens": [t.to_dict() for t in self.tokens], "kept": self.kept,
            "mass": self.mass, "entropy": self.entropy, "threshold": self.threshold,
        }  # fmt: skip


@dataclass(frozen=True)
class StagesReport:
    """Every stage of one step; `probabilities` (stages, vocab) holds each stage's whole
    distribution (float64), for views that line the same tokens up across stages."""

    stages: list[StageSummary]
    chosen: TokenProbability | None
    settings: SamplingSettings
    probabilities: torch.Tensor

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def probability(self, stage: str, token_id: int) -> float:
        return float(self.probabilities[self.names.index(stage), token_id])

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.to_dict() for s in self.stages], "chosen": self.chosen and self.chosen.to_dict()}


def entropy_bits(probs: torch.Tensor) -> float:
    """-Σ p log2 p over the tokens with p > 0."""
    positive = probs[probs > 0]
    return float(-(positive * positive.log2()).sum()) + 0.0  # + 0.0: never -0.0


def check_top(top: int) -> None:
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= MAX_TOP:
        raise InvalidSettingError(f"top must be an integer from 1 to {MAX_TOP}, got {top!r}")


def stages_report(
    logits: torch.Tensor,
    settings: SamplingSettings,
    label: Callable[[int], str],
    *,
    previous_ids: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    top: int = 20,
    chosen: int | None = None,
    generator: torch.Generator | None = None,
) -> StagesReport:
    """Summarise the stages of one step. logits: (vocab,) float; previous_ids: the context the
    penalties count; label: a token id's readable string.

    chosen: the token taken at this step; when None it is what `next_token` picks (greedy: the
    argmax; sampling: a draw with `generator`, or none without one).
    """
    check_top(top)
    vocab = logits.shape[-1]
    if chosen is not None and not 0 <= chosen < vocab:
        raise InvalidSettingError(f"chosen token id {chosen} is outside the vocabulary (0..{vocab - 1})")
    if chosen is None and (settings.greedy or generator is not None):
        chosen = int(next_token(logits, settings, previous_ids, generator, allowed))
    named = sampling_stages(logits, settings, previous_ids, allowed)
    probabilities = torch.stack([stage.double().softmax(dim=-1) for _, stage in named])
    summaries = []
    for i, (name, stage) in enumerate(named):
        probs, kept = probabilities[i], stage > -math.inf
        mass, threshold = 1.0, None
        before = probabilities[i - 1] if i > 0 else probs
        if bool((kept.logical_not() & (before > 0)).any()):  # the stage removed some tokens
            mass, threshold = float(before[kept].sum()), float(before[kept].min())
        summaries.append(
            StageSummary(name, _top_tokens(probs, top, chosen, label), int(kept.sum()), mass, entropy_bits(probs), threshold)
        )
    final = probabilities[-1]
    picked = None if chosen is None else TokenProbability(chosen, label(chosen), float(final[chosen]))
    return StagesReport(summaries, picked, settings, probabilities)


def _top_tokens(probs: torch.Tensor, top: int, chosen: int | None, label: Callable[[int], str]) -> list[TokenProbability]:
    """The `top` most probable tokens with p > 0, and the chosen token wherever it falls."""
    values, ids = probs.topk(min(top, probs.shape[-1]))
    listed = [(int(i), float(p)) for p, i in zip(values, ids) if p > 0]
    if chosen is not None and all(i != chosen for i, _ in listed):
        listed.append((chosen, float(probs[chosen])))
    return [TokenProbability(i, label(i), p) for i, p in listed]


def model_stages(model: Model, token_ids: list[int], settings: SamplingSettings, *, top: int = 20,
                 chosen: int | None = None) -> StagesReport:
    """The stages of the step after token_ids, as `model.generate` would take it: the penalties
    count the prompt (a decoder-only model) or the decoder's start token (an encoder-decoder)."""
    check_token_ids(token_ids, model.config.vocab_size, model.config.context_length)
    history = penalty_context(model, token_ids)
    labels = token_labels(model.tokenizer)
    return stages_report(
        model.next_token_logits(token_ids), settings, labels.label, previous_ids=history,
        top=top, chosen=chosen, generator=make_generator(settings.seed),
    )  # fmt: skip


def penalty_context(model: Model, token_ids: list[int]) -> torch.Tensor:
    """What the penalties count at the step after token_ids, as generation counts it: the context
    of a decoder-only model, the start token of an encoder-decoder's decoder."""
    family = model.config.family
    if family == "encoder":
        raise UnsupportedModelError(f"{model.source.name} is an encoder-only model: it does not choose next tokens")
    return torch.tensor(token_ids if family == "decoder" else [model.decoder_start_token_id])  # type: ignore[attr-defined]


def check_token_ids(token_ids: list[int], vocab_size: int, limit: int) -> None:
    if not token_ids:
        raise InvalidSettingError("no token ids: the context is empty")
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidSettingError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    if len(token_ids) > limit:
        raise ContextLengthError(f"{len(token_ids)} tokens is beyond the model's context window of {limit}")
