"""Turn a step's logits into the next token id.

Sampling is a chain of small pure functions over logits of shape (..., vocab). Each returns a new
tensor (the input is never edited) and marks filtered-out tokens with -inf. The order is fixed:

    penalties (repetition, then presence/frequency) -> grammar -> temperature -> top-k -> top-p
    -> min-p -> draw

Why this order:
- Penalties come first because they correct the model's raw preferences using the history; every
  later stage should see the corrected scores.
- The grammar stage (only when generation is constrained, e.g. to a JSON schema) removes every
  token the grammar forbids next, so temperature and the filters share out probability among
  allowed tokens only. Greedy decoding applies these two stages and takes the argmax.
- Temperature comes before the filters so that top-p and min-p measure probability mass in the
  distribution that will actually be drawn from (a hotter temperature lets more tokens through).
- top-k is a cheap, rank-only cut; top-p and min-p then work on what remains. None of the three
  can remove the most probable token, so the argmax always survives.
- The draw uses an explicit seeded `torch.Generator`, so a seed reproduces a whole generation.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from attendo.errors import InvalidSettingError

Stage = Callable[[torch.Tensor], torch.Tensor]

# What `sampling_stages` reports, in the order the stages run. "raw" is the model's logits and
# "final" what the token is drawn from; "grammar" is there only when a mask of allowed tokens is.
STAGE_NAMES = ("raw", "penalties", "grammar", "temperature", "top_k", "top_p", "min_p", "final")


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InvalidSettingError(f"temperature must be a finite number >= 0, got {temperature}")


def _check_top_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise InvalidSettingError(f"top_k must be an integer >= 0 (0 turns it off), got {k!r}")


def _check_top_p(p: float) -> None:
    if not 0 < p <= 1:  # also rejects NaN
        raise InvalidSettingError(f"top_p must be in (0, 1], got {p}")


def _check_min_p(p: float) -> None:
    if not 0 <= p <= 1:
        raise InvalidSettingError(f"min_p must be in [0, 1], got {p}")


def _check_repetition_penalty(penalty: float) -> None:
    if not (math.isfinite(penalty) and penalty > 0):
        raise InvalidSettingError(f"repetition_penalty must be a finite number > 0, got {penalty}")


def _check_openai_penalty(name: str, value: float) -> None:
    if not -2 <= value <= 2:
        raise InvalidSettingError(f"{name} must be in [-2, 2], got {value}")


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick each next token. The defaults mean plain greedy decoding."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None = a fresh random seed per generation

    def __post_init__(self) -> None:
        _check_temperature(self.temperature)
        _check_top_k(self.top_k)
        _check_top_p(self.top_p)
        _check_min_p(self.min_p)
        _check_repetition_penalty(self.repetition_penalty)
        _check_openai_penalty("presence_penalty", self.presence_penalty)
        _check_openai_penalty("frequency_penalty", self.frequency_penalty)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise InvalidSettingError(f"seed must be None or an integer in [0, 2**64), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """True when every setting collapses the draw to the single most likely token."""
        return not self.do_sample or self.temperature == 0 or self.top_k == 1


def _history_like(logits: torch.Tensor, previous_ids: torch.Tensor) -> torch.Tensor:
    # One history may be shared by a whole batch: broadcast (n,) to (..., n).
    return previous_ids.expand(*logits.shape[:-1], previous_ids.shape[-1])


def apply_repetition_penalty(logits: torch.Tensor, previous_ids: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """CTRL penalty on every token already seen (once, however often it was seen).

    Positive logits are divided by `penalty` and negative ones multiplied, so a penalty > 1 always
    makes a seen token less likely whatever the sign of its logit.
    previous_ids: (..., n) long, token ids generated or prompted so far.
    """
    _check_repetition_penalty(penalty)
    ids = _history_like(logits, previous_ids)
    seen = logits.gather(-1, ids)
    penalized = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, ids, penalized)


def apply_presence_frequency(logits: torch.Tensor, previous_ids: torch.Tensor,
                             presence: float, frequency: float) -> torch.Tensor:
    """OpenAI penalties: subtract presence * [count > 0] + frequency * count from each logit."""
    _check_openai_penalty("presence_penalty", presence)
    _check_openai_penalty("frequency_penalty", frequency)
    ids = _history_like(logits, previous_ids)
    counts = torch.zeros_like(logits).scatter_add(-1, ids, torch.ones_like(ids, dtype=logits.dtype))
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by the temperature. Temperature 0 is its limit: only the maximal logits survive."""
    _check_temperature(temperature)
    if temperature == 0:
        return logits.masked_fill(logits < logits.amax(dim=-1, keepdim=True), -math.inf)
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k highest logits (ties broken by torch.topk); k = 0 keeps everything."""
    _check_top_k(k)
    if k == 0 or k >= logits.shape[-1]:
        return logits.clone()
    values, indices = logits.topk(k, dim=-1)
    return torch.full_like(logits, -math.inf).scatter(-1, indices, values)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the fewest most-probable tokens whose total probability reaches p.

    A token is kept when the mass of the tokens ranked above it is still below p, which always
    keeps the top token.
    """
    _check_top_p(p)
    if p == 1:
        # Short-circuit: float rounding could otherwise push the running sum to 1 early and drop
        # a tail that p = 1 promises to keep.
        return logits.clone()
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.float().softmax(dim=-1)
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = mass_above >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens whose probability is below p times the top token's probability.

    Compared in log space (logit < max logit + log p), which is exact and cannot underflow.
    """
    _check_min_p(p)
    if p == 0:
        return logits.clone()
    threshold = logits.amax(dim=-1, keepdim=True) + math.log(p)
    return logits.masked_fill(logits < threshold, -math.inf)


def draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row, drawn from softmax(logits): (..., vocab) -> (...) long.

    generator=None uses torch's global RNG.
    """
    probs = logits.float().softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    u = torch.rand(flat.shape[0], 1, generator=generator)
    return _inverse_cdf(flat, u).reshape(probs.shape[:-1])


def draw_each(logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Row i of logits (rows, vocab) drawn with generators[i]: the tokens draw(logits[i],
    generators[i]) gives row by row (softmax and the running sums are computed row by row either
    way), with one pass over the vocabulary for all the rows of a batch."""
    u = torch.cat([torch.rand(1, 1, generator=generator) for generator in generators])
    return _inverse_cdf(logits.float().softmax(dim=-1), u)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """For probabilities (rows, vocab) and a uniform number in [0, 1) per row (rows, 1), the
    first token whose running total exceeds u times the row's total: (rows,) long.

    A token of probability 0 adds nothing, so it is never the first. torch.multinomial computes
    the same draw in about 1 ms for 49k tokens, this in 40 µs."""
    totals = probs.cumsum(dim=-1)
    total = totals[:, -1:]
    u = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # below the total, after rounding too
    return torch.searchsorted(totals, u, right=True)[:, 0]


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token per row: (..., vocab) -> (...) long."""
    return logits.argmax(dim=-1)


def apply_penalties(logits: torch.Tensor, previous_ids: torch.Tensor | None,
                    settings: SamplingSettings) -> torch.Tensor:
    """The history-dependent stage: repetition penalty, then presence and frequency penalties."""
    out = logits.clone()
    if previous_ids is None or previous_ids.shape[-1] == 0:
        return out
    if settings.repetition_penalty != 1:
        out = apply_repetition_penalty(out, previous_ids, settings.repetition_penalty)
    if settings.presence_penalty != 0 or settings.frequency_penalty != 0:
        out = apply_presence_frequency(out, previous_ids, settings.presence_penalty, settings.frequency_penalty)
    return out


def mask_tokens(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The grammar stage: remove every token whose entry in `allowed` (bool, (..., vocab)) is False."""
    if allowed.shape[-1] != logits.shape[-1] or allowed.dtype != torch.bool:
        raise InvalidSettingError(
            f"a token mask must be bool with {logits.shape[-1]} entries per row, got {allowed.dtype} {list(allowed.shape)}"
        )
    return logits.masked_fill(~allowed, -math.inf)


def _chain(settings: SamplingSettings, previous_ids: torch.Tensor | None,
           allowed: torch.Tensor | None) -> list[tuple[str, Stage]]:
    """The stages between "raw" and "final", each with its setting bound."""
    chain: list[tuple[str, Stage]] = [("penalties", partial(apply_penalties, previous_ids=previous_ids, settings=settings))]
    if allowed is not None:
        chain.append(("grammar", partial(mask_tokens, allowed=allowed)))
    return chain + [
        ("temperature", partial(apply_temperature, temperature=settings.temperature)),
        ("top_k", partial(top_k_filter, k=settings.top_k)),
        ("top_p", partial(top_p_filter, p=settings.top_p)),
        ("min_p", partial(min_p_filter, p=settings.min_p)),
    ]


def _only_argmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.full_like(logits, -math.inf).scatter(-1, argmax(logits)[..., None], 0.0)


def sampling_stages(logits: torch.Tensor, settings: SamplingSettings,
                    previous_ids: torch.Tensor | None = None,
                    allowed: torch.Tensor | None = None) -> list[tuple[str, torch.Tensor]]:
    """Every stage's output logits, named as in STAGE_NAMES: what the sampling-stages view shows.

    A stage whose setting is off passes its input through unchanged. "final" is what the next
    token is drawn from: the min_p stage's logits when sampling, and for greedy settings only the
    argmax of the grammar (or penalties) stage, which is what `next_token` picks.
    """
    stages = [("raw", logits.clone())]
    for name, stage in _chain(settings, previous_ids, allowed):
        stages.append((name, stage(stages[-1][1])))
    if settings.greedy:
        choosing = stages[2 if allowed is not None else 1][1]
        return stages + [("final", _only_argmax(choosing))]
    return stages + [("final", stages[-1][1].clone())]


def process_logits(logits: torch.Tensor, settings: SamplingSettings,
                   previous_ids: torch.Tensor | None = None,
                   allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Apply every stage in order and return the logits a sampled token is drawn from.

    logits: (vocab,) or (batch, vocab); previous_ids: (n,) shared by the batch, or (batch, n);
    allowed: bool (vocab,) or (batch, vocab), the grammar's mask, or None.
    """
    out = logits
    for name, stage in _chain(settings, previous_ids, allowed):
        if not _passes_through(name, settings, previous_ids):
            out = stage(out)
    return logits.clone() if out is logits else out


def _passes_through(name: str, settings: SamplingSettings, previous_ids: torch.Tensor | None) -> bool:
    """Whether a stage's setting is its neutral value, so that it would return a copy of its input
    (skipping the copies matters in a server: each is a vocabulary-sized tensor per row per token)."""
    no_history = previous_ids is None or previous_ids.shape[-1] == 0
    neutral = {
        "penalties": no_history or (settings.repetition_penalty == 1 and not settings.presence_penalty and not settings.frequency_penalty),
        "temperature": settings.temperature == 1,
        "top_k": settings.top_k == 0,
        "top_p": settings.top_p == 1,
        "min_p": settings.min_p == 0,
    }
    return neutral.get(name, False)


def next_token(logits: torch.Tensor, settings: SamplingSettings,
               previous_ids: torch.Tensor | None = None,
               generator: torch.Generator | None = None,
               allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Choose the next token id per row: (..., vocab) -> (...) long.

    Greedy settings take the argmax after the penalties and the grammar mask (temperature and the
    filters cannot change it). Otherwise every stage runs and one token is drawn with `generator`;
    make it once per generation with `make_generator(settings.seed)` so a seed reproduces the run.
    """
    if settings.greedy:
        # no history: the penalties' copy of the logits would only be read
        chosen = logits if previous_ids is None else apply_penalties(logits, previous_ids, settings)
        return argmax(chosen if allowed is None else mask_tokens(chosen, allowed))
    return draw(process_logits(logits, settings, previous_ids, allowed), generator)


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed`, or with fresh OS randomness when seed is None."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator
