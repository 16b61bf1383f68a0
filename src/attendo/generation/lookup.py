"""Prompt-lookup decoding: draft tokens from the text itself, check them all in one forward pass.

When a model copies (rewriting code, quoting or summarising its prompt, repeating a list), the
tokens it is about to write often already stand earlier in the prompt or in what it has written.
Each decode step then:

1. ``NgramDrafter.propose``: find the latest earlier place where the sequence's last n tokens
   occur (n = 4, else 3, else 2) and take the tokens that followed them there, as many as the
   sequence's draft length: it starts at 2, grows by 2 (up to ``draft_tokens``) after a draft
   that was taken whole and shrinks by 1 after one that was not, so text that copies gets long
   drafts and text that does not wastes little;
2. run the last chosen token and the draft through the network as one pass at their positions
   (one row each, like a prefill chunk), which gives the logits after every one of them;
3. choose tokens from those logits in order with the loop's own ``accept_token`` (greedy, or
   sampled with the sequence's seeded generator), keeping on while each chosen token equals the
   draft's next one: the first that differs, or the one after the whole draft, ends the step.

So one pass yields between 1 and draft_tokens + 1 tokens. The rejected draft tokens' keys and
values stay in the cache behind the sequence's end, where the causal mask hides them until the
next step writes its own tokens over them (the KV cache's contract): nothing is rolled back.

The output is the plain loop's, token for token, when the logits of a token in a pass of several
rows are the same bits as in a pass of one: true where attendo.kernels multiply and attend
(every row's reduction order is its own; see tests/test_batch_invariance.py). The chosen tokens
then see exactly the logits and, when sampling, the generator draws the plain loop gives them.
Without the kernels (no C compiler) a pass of several rows may round differently in the last
bits, and a near tie may then go the other way, as it may between a prompt prefilled whole and
in chunks. A compiled decode step (optimize.compile_decode) rounds differently from the eager
pass that checks drafts, so a batch with one refuses lookup.

It pays when a draft is often right: a pass of k + 1 rows costs more than a pass of one, but
less than k + 1 of them, since a small model's step mostly reads weights. `LookupBatch` drafts
only while a single sequence is decoding (batch 1); beside others, the batch already shares
each read of the weights, and it decodes as `Batch` does.
"""

from __future__ import annotations

from typing import Any

import torch

from attendo.errors import InvalidSettingError
from attendo.generation.loop import Batch, Event, Sequence

# The longest match first: it predicts the continuation best. No single tokens: a lone word recurs
# too often with another continuation, and a wrong draft costs a wider pass for nothing.
NGRAM_SIZES = (4, 3, 2)
# A sequence's drafts start this long and grow by GROWTH tokens after each draft taken whole (up to
# the draft_tokens asked for), and shrink by one after each draft that failed.
FIRST_DRAFT_LENGTH = 2
GROWTH = 2


def check_draft_tokens(draft_tokens: Any) -> int:
    """The number of draft tokens per step as given (0: off), or an InvalidSettingError."""
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 0:
        raise InvalidSettingError(f"prompt_lookup must be a whole number of draft tokens >= 0, got {draft_tokens!r}")
    return draft_tokens


class NgramDrafter:
    """A sequence's tokens, and where each of its n-grams last occurred with a token after it."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        # n-gram → the index of the token that followed its latest occurrence
        self.followers: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.tokens)
            for n in NGRAM_SIZES:
                if n <= end:
                    self.followers[tuple(self.tokens[end - n :])] = end
            self.tokens.append(token)

    def propose(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the last n-gram."""
        for n in NGRAM_SIZES:
            if n <= len(self.tokens):
                start = self.followers.get(tuple(self.tokens[-n:]))
                if start is not None:
                    return self.tokens[start : start + limit]
        return []


class LookupBatch(Batch):
    """A `Batch` whose lone decoding sequence checks prompt-lookup drafts (module docstring)."""

    def __init__(self, *args: Any, draft_tokens: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.decode_step is not self.network:
            # Its fused operations round differently from the eager pass that checks the drafts.
            raise InvalidSettingError(
                "prompt_lookup does not work with a compiled decode step (speed_up of a network the fused C "
                "blocks cannot run, e.g. float16 weights); leave out the speed-up or the lookup"
            )
        self.draft_tokens = check_draft_tokens(draft_tokens)
        self.drafting: tuple[Sequence, NgramDrafter] | None = None  # the lone sequence, and its n-grams
        self.draft_length = min(FIRST_DRAFT_LENGTH, self.draft_tokens)  # this sequence's, for its next draft
        self.drafted = 0  # draft tokens checked, and how many of them were chosen
        self.accepted = 0

    @property
    def acceptance(self) -> float | None:
        """The share of draft tokens that were chosen, None before any draft."""
        return self.accepted / self.drafted if self.drafted else None

    def _decode(self) -> list[Event]:
        if len(self.decoding) != 1 or not self.draft_tokens:
            return super()._decode()
        sequence = self.decoding[0]
        drafter = self._drafter(sequence)
        # Only tokens that can still be generated: the pass makes len(draft) + 1 of them.
        room = min(sequence.request.max_new_tokens - len(sequence.generated), self.max_len - sequence.length + 1)
        draft = drafter.propose(min(self.draft_length, room - 1))
        if not draft:
            return super()._decode()
        tokens = [sequence.generated[-1], *draft]
        start = sequence.length - 1
        logits = self.network(
            torch.tensor([tokens]), torch.arange(start, start + len(tokens))[None], cache=self.cache,
            slots=torch.tensor([sequence.slot]),
        )[0]  # (len(tokens), vocab): the logits after each of them
        events = []
        for row, proposed in zip(logits, [*draft, None]):
            events.append(self._accept(sequence, row))
            if sequence.finished or events[-1].token_id != proposed:
                break
        taken = sum(event.token_id == proposed for event, proposed in zip(events, draft))
        self.drafted, self.accepted = self.drafted + len(draft), self.accepted + taken
        # Longer drafts while they hold, shorter when they fail: a wrong one costs its rows for nothing.
        grown = self.draft_length + GROWTH if taken == len(draft) else self.draft_length - 1
        self.draft_length = max(1, min(self.draft_tokens, grown))
        return events

    def _drafter(self, sequence: Sequence) -> NgramDrafter:
        """The sequence's drafter, brought up to date with the tokens chosen since the last step."""
        if self.drafting is None or self.drafting[0] is not sequence:
            self.drafting = (sequence, NgramDrafter())
            self.draft_length = min(FIRST_DRAFT_LENGTH, self.draft_tokens)
        drafter = self.drafting[1]
        prompt = sequence.request.prompt_ids
        known = len(drafter.tokens)
        drafter.extend(prompt[known:] + sequence.generated[max(0, known - len(prompt)) :])
        return drafter
