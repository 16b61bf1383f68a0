"""The generation loop: prefill each prompt once, then decode every running sequence together.

A `Batch` owns all generation state (KV cache slots, positions, per-sequence sampler state), so
the same loop serves one prompt, a list of prompts, and a server that adds and cancels requests
while others are running (continuous batching): a sequence joins at the next step, its prompt
is prefilled in bounded chunks so it does not stall the others (the prompts waiting at a step
share one forward), and a finished one frees its slot at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import torch

from attendo.errors import ContextLengthError, InvalidSettingError
from attendo.generation.sampler import SamplingSettings, draw_each, make_generator, next_token, process_logits
from attendo.generation.text import TextStream
from attendo.models.decoder import DecoderLM
from attendo.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from attendo.prompting.grammar import Grammar, GrammarState

FinishReason = Literal["stop", "length"]
# Padded prompt tokens per prefill forward: the modules' path holds attention scores of
# (prompts, heads, tokens, cache length) for it.
PREFILL_GROUP_TOKENS = 2048


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    settings: SamplingSettings
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; n: the chosen token's logprob and the top n alternatives
    grammar: Grammar | None = None  # structured output: what the generated text must match


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float  # under the model's own distribution, before any sampling setting
    top: list[tuple[int, str, float]]


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # the new tokens only
    finish_reason: FinishReason
    prompt_token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Sequence:
    """One request in flight."""

    request: Request
    stream: TextStream
    generator: torch.Generator
    slot: int = -1
    prefilled: int = 0
    reused: int = 0  # prompt tokens whose keys and values were already in its slot (Batch reuse_prefixes)
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    grammar: GrammarState | None = field(init=False)  # this sequence's own place in its grammar

    def __post_init__(self) -> None:
        self.grammar = self.request.grammar.start() if self.request.grammar is not None else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        return len(self.request.prompt_ids) + len(self.generated)

    def cached_ids(self) -> list[int]:
        """The tokens whose keys and values its slot holds: the prompt's prefilled part, and once it
        decodes, every token but the newest (which the next step feeds in)."""
        prompt = self.request.prompt_ids
        if self.prefilled < len(prompt):
            return prompt[: self.prefilled]
        return (prompt + self.generated)[:-1]

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.stream.text,
            token_ids=list(self.generated),
            finish_reason=self.finish_reason or "length",
            prompt_token_ids=list(self.request.prompt_ids),
            logprobs=list(self.logprobs) if self.request.logprobs is not None else None,
        )


_Chunk = tuple[Sequence, int, int]  # a prompt's next chunk: its sequence, start, end


@dataclass(frozen=True)
class Event:
    """What one chosen token produced for its sequence: a text piece (maybe empty), whether it
    ended, and its logprob when the request asked for them. (A step may choose several tokens of
    one sequence: see attendo.generation.lookup.)"""

    sequence: Sequence
    token_id: int
    text: str
    finished: bool
    logprob: TokenLogprob | None = None


def check_request(request: Request, context_length: int, vocab_size: int) -> None:
    if not request.prompt_ids:
        raise InvalidSettingError("the prompt is empty")
    if request.max_new_tokens < 1:
        raise InvalidSettingError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
    bad = [t for t in request.prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidSettingError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    total = len(request.prompt_ids) + request.max_new_tokens
    if total > context_length:
        raise ContextLengthError(
            f"the prompt ({len(request.prompt_ids)} tokens) plus max_new_tokens ({request.max_new_tokens}) "
            f"is {total} tokens, beyond the model's context window of {context_length}"
        )
    if any(not s for s in request.stop):
        raise InvalidSettingError("stop strings must not be empty")


class Batch:
    """Sequences sharing one KV cache of `slots` rows; `step` advances every one of them."""

    def __init__(
        self,
        network: DecoderLM,
        tokenizer: TextTokenizer,
        eos_token_ids: list[int],
        slots: int,
        max_len: int,
        prefill_chunk: int = 512,
        decode_step: Callable[..., torch.Tensor] | None = None,
        reuse_prefixes: bool = False,
    ) -> None:
        """decode_step: the network compiled for fixed shapes (optimize.compile_decode), used for
        every decode step with a cache of fixed shapes; prefill always runs the network eagerly.

        reuse_prefixes: a free slot keeps the keys and values its last sequence left, and a new
        sequence takes the free slot whose kept tokens begin its prompt for longest, prefilling
        only the rest. Its logits are the bits a whole prefill gives wherever a prompt prefilled
        in chunks gets them (the kernels' products and attention: tests/test_batch_invariance.py),
        since the kept keys and values are those of the same tokens at the same positions."""
        self.network = network
        self.decode_step = network if decode_step is None else decode_step
        self.tokenizer = tokenizer
        self.eos = set(eos_token_ids)
        self.max_len = max_len
        self.prefill_chunk = prefill_chunk
        self.cache = network.new_cache(slots, max_len, fixed_shapes=decode_step is not None)
        self.free_slots = list(range(slots))
        self.reuse_prefixes = reuse_prefixes
        self.slot_tokens: list[list[int]] = [[] for _ in range(slots)]  # a free slot's kept tokens
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.decoding: list[Sequence] = []

    def add(self, request: Request) -> Sequence:
        check_request(request, min(self.network.config.context_length, self.max_len), self.network.config.vocab_size)
        sequence = Sequence(request, TextStream(self.tokenizer, request.stop), make_generator(request.settings.seed))
        self.waiting.append(sequence)
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        """Drop a sequence wherever it is; its slot is free for the next step."""
        for group in (self.prefilling, self.decoding):
            if sequence in group:
                group.remove(sequence)
                self._free(sequence)
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        if sequence.finish_reason is None:
            sequence.finish_reason = "stop"

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        events = self._decode() if self.decoding else []
        while self.waiting and self.free_slots:
            sequence = self.waiting.popleft()
            self._place(sequence)
            self.prefilling.append(sequence)
        if self.prefilling:
            events += self._prefill()
        return events

    def _place(self, sequence: Sequence) -> None:
        """Give a waiting sequence a free slot: the first one, or with reuse_prefixes the one whose
        kept tokens share the longest start with its prompt, whose keys and values it keeps
        (all but the prompt's last token at most: the prefill must run one for the logits)."""
        prompt, place, shared = sequence.request.prompt_ids, 0, 0
        if self.reuse_prefixes:
            for place_here, slot in enumerate(self.free_slots):
                kept = self.slot_tokens[slot]
                same = next((i for i, (a, b) in enumerate(zip(kept, prompt)) if a != b), min(len(kept), len(prompt)))
                if same > shared:
                    place, shared = place_here, same
        sequence.slot = self.free_slots.pop(place)
        sequence.prefilled = sequence.reused = min(shared, len(prompt) - 1)

    def _free(self, sequence: Sequence) -> None:
        kept = sequence.cached_ids() if self.reuse_prefixes else []
        if self.decode_step is not self.network:
            # A compiled step rounds differently from the eager prefill a fresh prompt would get.
            kept = kept[: sequence.prefilled]
        self.slot_tokens[sequence.slot] = kept
        self.free_slots.append(sequence.slot)

    def _prefill(self) -> list[Event]:
        """The next chunk of every prompt being prefilled, several prompts to a forward; a prompt
        whose last chunk has run joins the decoding ones with its first token."""
        chunks = [(s, s.prefilled, min(s.prefilled + self.prefill_chunk, len(s.request.prompt_ids))) for s in self.prefilling]
        events = []
        for group in self._prefill_groups(chunks):
            logits = self._prefill_together(group)
            for (sequence, _, end), row in zip(group, logits):
                sequence.prefilled = end
                if end == len(sequence.request.prompt_ids):
                    self.prefilling.remove(sequence)
                    self.decoding.append(sequence)
                    events.append(self._accept(sequence, row))
        return events

    def _prefill_groups(self, chunks: list[_Chunk]) -> Iterator[list[_Chunk]]:
        """Chunks in groups of at most PREFILL_GROUP_TOKENS once padded to the longest; a chunk
        whose padding would pass the end of the cache goes alone."""
        limit = min(self.max_len, self.network.config.context_length)
        group: list[_Chunk] = []
        for chunk in chunks:
            widest = max(end - start for _, start, end in [*group, chunk])
            fits = all(start + widest <= limit for _, start, _ in [*group, chunk])
            if group and (not fits or (len(group) + 1) * widest > PREFILL_GROUP_TOKENS):
                yield group
                group = []
            group.append(chunk)
        if group:
            yield group

    def _prefill_together(self, group: list[_Chunk]) -> torch.Tensor:
        """Run the chunks as one forward; returns each one's next-token logits (rows, vocab).

        Shorter chunks are padded with their last token at the positions after it: those keys
        land where the prompt's next chunk or its first generated token is written before any
        query may read them, and every row is computed on its own (the kernels' products and
        attention are batch-invariant), so each prompt gets the bits it would get alone."""
        widest = max(end - start for _, start, end in group)
        tokens, positions = [], []
        for sequence, start, end in group:
            ids = sequence.request.prompt_ids[start:end]
            tokens.append(ids + ids[-1:] * (widest - len(ids)))
            positions.append(range(start, start + widest))
        return self.network(
            torch.tensor(tokens),
            torch.tensor(positions),
            cache=self.cache,
            slots=torch.tensor([sequence.slot for sequence, _, _ in group]),
            logits_index=torch.tensor([end - start - 1 for _, start, end in group]),
        )

    def _decode(self) -> list[Event]:
        running = list(self.decoding)
        rows = running
        if self.decode_step is not self.network:
            # A compiled step is specialised to its shapes: round the rows up to a power of two
            # by repeating the last one (it writes the same keys and values to the same place),
            # so a batch whose size keeps changing compiles at most log2(slots) + 1 shapes.
            bucket = min(self.cache.slots, 1 << (len(running) - 1).bit_length())
            rows = running + running[-1:] * (bucket - len(running))
        tokens = torch.tensor([[s.generated[-1]] for s in rows])
        positions = torch.tensor([[s.length - 1] for s in rows])
        slots = [s.slot for s in rows]
        slot_index = None if slots == list(range(len(slots))) else torch.tensor(slots)
        logits = self.decode_step(
            tokens, positions, cache=self.cache, slots=slot_index, logits_index=torch.zeros(len(rows), dtype=torch.long)
        )
        drawn = _draw_together(running, logits)
        return [self._accept(sequence, row, drawn.get(i)) for i, (sequence, row) in enumerate(zip(running, logits))]

    def _accept(self, sequence: Sequence, logits: torch.Tensor, token: int | None = None) -> Event:
        event = accept_token(sequence, logits, logits, sequence.request.prompt_ids, self.eos, self.tokenizer, token)
        if sequence.finished:
            self.decoding.remove(sequence)
            self._free(sequence)
        return event


def _draw_together(running: list[Sequence], logits: torch.Tensor) -> dict[int, int]:
    """{row: token} for the rows whose next token depends on their settings and logits alone
    (sampling, no penalties, no grammar), drawn together where rows share their settings but the
    seed: each row's stages and draw are computed row by row, so each gets the token it would get
    alone, and a batch pays one pass over the vocabulary per stage instead of one per row."""
    groups: dict[SamplingSettings, list[int]] = {}
    for row, sequence in enumerate(running):
        settings = sequence.request.settings
        if not settings.greedy and sequence.grammar is None and not _uses_history(settings):
            groups.setdefault(_unseeded(settings), []).append(row)
    drawn: dict[int, int] = {}
    for settings, rows in groups.items():
        if len(rows) > 1:
            # Every row in one group: the logits as they are (process_logits never edits its
            # input), not a copy of all of them.
            scores = logits if len(rows) == len(logits) else logits[rows]
            chosen = draw_each(process_logits(scores, settings), [running[row].generator for row in rows])
            drawn.update(zip(rows, chosen.tolist()))
    return drawn


@lru_cache(maxsize=1024)
def _unseeded(settings: SamplingSettings) -> SamplingSettings:
    """The settings without their seed, made once per request rather than at every step
    (replace() checks every field again)."""
    return replace(settings, seed=None)


def _uses_history(settings: SamplingSettings) -> bool:
    return settings.repetition_penalty != 1.0 or bool(settings.presence_penalty) or bool(settings.frequency_penalty)


def token_logprob(logits: torch.Tensor, token: int, top_n: int, tokenizer: TextTokenizer) -> TokenLogprob:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = []
    if top_n:
        values, ids = logprobs.topk(top_n)
        top = [(int(i), tokenizer.token_text(int(i)), float(v)) for v, i in zip(values, ids)]
    return TokenLogprob(token, tokenizer.token_text(token), float(logprobs[token]), top)


def accept_token(
    sequence: Sequence,
    scores: torch.Tensor,
    logits: torch.Tensor,
    context: list[int],
    eos_ids: Collection[int],
    tokenizer: TextTokenizer,
    token: int | None = None,
) -> Event:
    """Choose a sequence's next token, show it, and check the stops.

    scores (vocab,) are what the sampler chooses from (the logits, or the logits with banned
    tokens removed); log-probabilities are reported from the model's own logits. context is what
    precedes the generated tokens for the history-dependent penalties. A sequence with a grammar
    chooses among the tokens its grammar allows, and ends when the grammar admits nothing more.
    token: the token when it was chosen already (drawn with the batch's others, see _draw_together).
    """
    request, settings, grammar = sequence.request, sequence.request.settings, sequence.grammar
    if token is None:
        history = torch.tensor(context + sequence.generated) if _uses_history(settings) else None
        allowed = grammar.allowed() if grammar is not None else None
        token = int(next_token(scores, settings, history, sequence.generator, allowed))
    logprob = None
    if request.logprobs is not None:
        logprob = token_logprob(logits, token, request.logprobs, tokenizer)
        sequence.logprobs.append(logprob)
    sequence.generated.append(token)
    if token not in eos_ids and grammar is not None:
        grammar.advance(token)
    if token in eos_ids:
        text, sequence.finish_reason = sequence.stream.flush(), "stop"
    elif grammar is not None and grammar.finished:
        text, sequence.finish_reason = sequence.stream.push(token) + sequence.stream.flush(), "stop"
    else:
        text = sequence.stream.push(token)
        if sequence.stream.stopped:
            sequence.finish_reason = "stop"
        elif len(sequence.generated) >= request.max_new_tokens:
            text, sequence.finish_reason = text + sequence.stream.flush(), "length"
    return Event(sequence, token, text, sequence.finished, logprob)


def run(batch: Batch, requests: list[Request]) -> Iterator[Event]:
    """Add requests to a batch and step it until all of them are done, yielding every event."""
    for request in requests:
        batch.add(request)
    while batch.busy:
        yield from batch.step()
