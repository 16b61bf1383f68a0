"""Beam search: follow the num_beams likeliest sequences instead of one, for translation and summaries.

One step, as Hugging Face transformers does it (so the outputs match):

1. every running beam scores each next token: its own log-probability so far + log p(token);
2. of all beams × vocabulary candidates keep the best 2·num_beams, enough that num_beams remain
   even if the best ones all end;
3. a candidate that ends (end-of-sequence token, or the length limit) and ranks among the first
   num_beams becomes a finished hypothesis, scored log-probability / length ** length_penalty;
4. the best num_beams candidates that did not end are the next running beams.

It stops when the finished hypotheses can no longer be beaten (``early_stopping``: True stops
once num_beams hypotheses are finished; False stops when the best running beam, at its current
length, scores below the worst finished one; "never" only when that is certain), or at the limit.

Beam search picks the likeliest sequences, so the sampler's penalties apply (to log-probabilities,
as in transformers) but its temperature and filters do not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from attendo.errors import InvalidSettingError
from attendo.generation.loop import GenerationResult, Request, check_request
from attendo.generation.sampler import SamplingSettings, apply_presence_frequency, apply_repetition_penalty
from attendo.generation.text import TextStream
from attendo.models.decoder import DecoderLM
from attendo.tokenizer import TextTokenizer

_ENDED = -1.0e9  # the score that keeps an ended candidate from running on


@dataclass(frozen=True)
class BeamSettings:
    num_beams: int = 1  # 1: no beam search (greedy decoding or sampling)
    length_penalty: float = 1.0  # finished score = log-probability / length ** length_penalty
    early_stopping: bool | Literal["never"] = False
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this size may occur twice

    def __post_init__(self) -> None:
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise InvalidSettingError(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if not math.isfinite(self.length_penalty):
            raise InvalidSettingError(f"length_penalty must be a finite number, got {self.length_penalty}")
        if self.early_stopping not in (True, False, "never"):
            raise InvalidSettingError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        size = self.no_repeat_ngram_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidSettingError(f"no_repeat_ngram_size must be an integer >= 0 (0 turns it off), got {size!r}")


BEAM_SETTING_NAMES = frozenset(f.name for f in fields(BeamSettings))
_SAMPLING_CONTROLS = ("temperature", "top_k", "top_p", "min_p")


def split_beam_settings(settings: dict[str, Any], defaults: dict[str, Any]) -> tuple[BeamSettings, dict[str, Any]]:
    """The beam settings (the model's generation defaults, then the given ones) and the rest.

    Asking to sample overrides a num_beams that only came from the model's defaults."""
    given = {k: v for k, v in settings.items() if k in BEAM_SETTING_NAMES and v is not None}
    chosen = {k: defaults[k] for k in BEAM_SETTING_NAMES if defaults.get(k) is not None} | given
    if "num_beams" not in given and (
        settings.get("do_sample") or any(settings.get(k) is not None for k in _SAMPLING_CONTROLS)
    ):
        chosen.pop("num_beams", None)
    return BeamSettings(**chosen), {k: v for k, v in settings.items() if k not in BEAM_SETTING_NAMES}


def ban_repeated_ngrams(logits: torch.Tensor, history: list[int], n: int) -> torch.Tensor:
    """-inf for every token that would complete an n-gram already in history (vocab,)."""
    if n == 0 or len(history) < n:
        return logits
    prefix = history[len(history) - n + 1 :]  # the n-1 tokens a new n-gram would start with
    banned = [history[i + n - 1] for i in range(len(history) - n + 1) if history[i : i + n - 1] == prefix]
    if not banned:
        return logits
    return logits.index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf"))


@dataclass(frozen=True)
class ForcedTokens:
    """Tokens an encoder-decoder must write at fixed steps, as transformers' forced_bos_token_id
    and forced_eos_token_id say: mBART-style translators start with the target language's token,
    and BART summarisers end with </s> when they reach the length limit.

    first: the first generated token (or None); last: the token(s) allowed at the last step
    max_new_tokens permits (empty: none forced).
    """

    first: int | None = None
    last: tuple[int, ...] = ()

    @classmethod
    def from_defaults(cls, defaults: dict[str, Any]) -> ForcedTokens:
        last = defaults.get("forced_eos_token_id")
        return cls(defaults.get("forced_bos_token_id"), tuple(last) if isinstance(last, list) else (last,) if last is not None else ())

    def apply(self, scores: torch.Tensor, step: int, max_new_tokens: int) -> torch.Tensor:
        """scores (..., vocab) for the token at 0-based step: at a forced step, 0 for the forced
        token(s) and -inf for every other (log-probabilities or logits alike); else unchanged."""
        forced = list(self.last) if self.last and step == max_new_tokens - 1 else []
        if not forced and self.first is not None and step == 0:
            forced = [self.first]
        if not forced:
            return scores
        out = torch.full_like(scores, float("-inf"))
        out[..., forced] = 0.0
        return out


def adjust_scores(
    scores: torch.Tensor, history: list[int], sampling: SamplingSettings, no_repeat_ngram_size: int
) -> torch.Tensor:
    """The history-dependent stages for one sequence's next-token scores (vocab,): the sampler's
    penalties, then the n-gram ban. Returns a new tensor, or scores itself when none applies."""
    if history and sampling.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, torch.tensor(history), sampling.repetition_penalty)
    if history and (sampling.presence_penalty or sampling.frequency_penalty):
        scores = apply_presence_frequency(
            scores, torch.tensor(history), sampling.presence_penalty, sampling.frequency_penalty
        )
    return ban_repeated_ngrams(scores, history, no_repeat_ngram_size)


@dataclass
class Hypothesis:
    tokens: list[int]  # the new tokens, the end-of-sequence token included
    score: float  # log-probability / length ** length_penalty


Advance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def beam_search(
    first_logits: torch.Tensor,
    advance: Advance,
    prefix: list[int],
    beam: BeamSettings,
    sampling: SamplingSettings,
    max_new_tokens: int,
    eos_ids: Collection[int],
    forced: ForcedTokens = ForcedTokens(),
) -> Hypothesis:
    """The best hypothesis for one input.

    first_logits (vocab,): the next-token logits after the prefix (the prompt of a decoder-only
    model, the start token of an encoder-decoder's decoder). advance(tokens, origins): make row i
    of the model's state (its KV cache) a copy of row origins[i], feed tokens[i] to row i, and
    return the next-token logits (num_beams, vocab).
    """
    k = beam.num_beams
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
    keep = max(2, 1 + len(eos)) * k
    running: list[list[int]] = [[] for _ in range(k)]
    # The beams start identical: only the first may propose, or the beams would all be copies.
    scores = torch.full((k,), _ENDED)
    scores[0] = 0.0
    finished: list[Hypothesis] = []
    logits = first_logits.expand(k, -1)
    for step in range(max_new_tokens):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        logprobs = torch.stack(
            [adjust_scores(row, prefix + running[i], sampling, beam.no_repeat_ngram_size) for i, row in enumerate(logprobs)]
        )
        logprobs = forced.apply(logprobs, step, max_new_tokens)
        vocab = logprobs.shape[-1]
        top_scores, top_index = (logprobs + scores[:, None]).view(-1).topk(min(keep, k * vocab))
        origins, tokens = top_index // vocab, top_index % vocab
        ends = torch.isin(tokens, eos) | (step + 1 == max_new_tokens)

        # Ended candidates among the first k become finished hypotheses; the best k are kept.
        normalized = top_scores / (step + 1) ** beam.length_penalty
        for rank in range(min(k, len(tokens))):
            if ends[rank]:
                sequence = running[int(origins[rank])] + [int(tokens[rank])]
                finished.append(Hypothesis(sequence, float(normalized[rank])))
        finished = sorted(finished, key=lambda h: h.score, reverse=True)[:k]

        # The best candidates that did not end run on.
        alive = top_scores + ends.float() * _ENDED
        chosen = alive.topk(k).indices
        running = [running[int(origins[i])] + [int(tokens[i])] for i in chosen]
        scores = alive[chosen]

        # Stop when the best running beam can no longer beat the worst of k finished hypotheses
        # (at its current length; "never": at the longest length when that scores better).
        length = max_new_tokens if beam.early_stopping == "never" and beam.length_penalty > 0 else step + 1
        worst = finished[-1].score if len(finished) == k else _ENDED
        improvable = bool(scores[0] / length**beam.length_penalty > worst)
        if not improvable or (len(finished) == k and beam.early_stopping is True) or bool(ends.all()):
            break
        logits = advance(tokens[chosen], origins[chosen])
    if not finished:
        return Hypothesis(running[0], float(scores[0]))
    return finished[0]


def check_beam_request(request: Request) -> None:
    if request.logprobs is not None:
        raise InvalidSettingError("logprobs are not available with beam search (num_beams > 1)")
    if not request.settings.greedy:
        raise InvalidSettingError(
            "beam search keeps the likeliest sequences and does not sample: use num_beams=1 to sample, "
            "or drop do_sample/temperature/top_k/top_p/min_p"
        )


def beam_result(
    request: Request, tokens: list[int], tokenizer: TextTokenizer, eos_ids: Collection[int]
) -> GenerationResult:
    """A finished hypothesis as a GenerationResult, cut at a stop string as streaming would."""
    stream = TextStream(tokenizer, request.stop)
    generated: list[int] = []
    for token in tokens:
        generated.append(token)
        if token in eos_ids:
            break
        stream.push(token)
        if stream.stopped:
            break
    if not stream.stopped:
        stream.flush()
    ended = stream.stopped or (generated and generated[-1] in eos_ids)
    return GenerationResult(stream.text, generated, "stop" if ended else "length", list(request.prompt_ids))


@torch.inference_mode()
def decoder_beam_search(
    network: DecoderLM, tokenizer: TextTokenizer, eos_ids: list[int], request: Request, beam: BeamSettings
) -> GenerationResult:
    """Beam search for a decoder-only model: the prompt is prefilled once into cache row 0, and
    the first step's choice copies it to every beam."""
    config = network.config
    check_beam_request(request)
    check_request(request, config.context_length, config.vocab_size)
    prompt, k = request.prompt_ids, beam.num_beams
    cache = network.new_cache(k, len(prompt) + request.max_new_tokens)
    first = network(
        torch.tensor([prompt]), cache=cache, slots=torch.tensor([0]), logits_index=torch.tensor([len(prompt) - 1])
    )[0]
    position = len(prompt)

    def advance(tokens: torch.Tensor, origins: torch.Tensor) -> torch.Tensor:
        nonlocal position
        cache.reorder(origins)
        positions = torch.full((k, 1), position)
        position += 1
        return network(tokens[:, None], positions, cache=cache, logits_index=torch.zeros(k, dtype=torch.long))

    best = beam_search(first, advance, prompt, beam, request.settings, request.max_new_tokens, eos_ids)
    return beam_result(request, best.tokens, tokenizer, eos_ids)
