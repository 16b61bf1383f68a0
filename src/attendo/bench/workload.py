"""The fixed workload every engine runs: the same token ids, greedy, the same number of tokens."""

from __future__ import annotations

from dataclasses import asdict, dataclass

PASSAGE = (
    "The history of computing is a story of abstractions piled on abstractions. Early machines were "
    "programmed by rewiring panels; then came stored programs, assemblers, compilers, operating "
    "systems and networks. Each layer hid the one below it and let more people build more things. "
    "Language models are the newest layer: they turn text into numbers, numbers into predictions, "
    "and predictions back into text, one token at a time. "
)


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int = 512  # prefill length
    new_tokens: int = 128  # greedy decode length at batch 1
    batch: int = 8  # sequences decoded together
    batch_prompt_tokens: int = 64
    threads: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


def prompt_ids(encode, n_tokens: int, variant: int = 0) -> list[int]:
    """Exactly n_tokens ids of English prose (variant shifts the text so batch rows differ)."""
    words = PASSAGE.split()
    text = " ".join(words[variant % len(words) :] + words[: variant % len(words)])
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += encode(text + " ")
    return ids[:n_tokens]
