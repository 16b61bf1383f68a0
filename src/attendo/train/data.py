"""Training data: files in, batches of token ids out.

- Reading: text files and folders (.txt, .md, and .jsonl with a text field) for pretraining;
  JSONL records for fine-tuning (train/examples.py turns them into token ids). A line that is not
  a JSON object is an error naming the file and line, raised before any training starts.
- Datasets: `PackedTokens` cuts one long stream of token ids into rows of equal length (texts
  joined by the end-of-text token, no padding); `PaddedExamples` keeps one example per row and pads
  each micro-batch to its longest row. Both give rows as {"tokens", "labels", "real"}: labels -100
  where no loss is taken, real False at padding; `Seq2SeqExamples` adds the encoder's "source" and
  "source_mask".
- Order: `GlobalOrder` says which examples make up the global batch of every optimizer step: a
  fresh seeded permutation per epoch, consumed in order. The step number alone fixes the data
  position, whatever the number of processes, which is what makes resuming exact (see
  train/checkpoint.py) and lets a run resume on a different number of processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from attendo.datafiles import files_in, read_jsonl, read_text_file
from attendo.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
IGNORE = -100  # the label of a position that takes no loss (prompt tokens, padding)


# --- reading files ---------------------------------------------------------------------------


def text_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files named, and the .txt/.md/.jsonl files inside the folders named (sorted)."""
    files: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            found = files_in(path, TEXT_SUFFIXES)
            if not found:
                raise DataError(f"{path}: no {', '.join(TEXT_SUFFIXES)} files in this folder")
            files += found
        elif path.is_file():
            if path.suffix not in TEXT_SUFFIXES:
                raise DataError(f"{path}: unsupported file type (use {', '.join(TEXT_SUFFIXES)})")
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    if not files:
        raise DataError("no training data given")
    return files


def read_texts(files: Iterable[Path], text_field: str = "text") -> list[str]:
    """The documents of the files: a .txt/.md file is one document, each JSONL line another."""
    texts = []
    for path in files:
        if path.suffix == ".jsonl":
            for number, record in read_jsonl(path):
                text = record.get(text_field)
                if not isinstance(text, str):
                    raise DataError(f'{path}:{number}: no "{text_field}" string in this line')
                texts.append(text)
        else:
            texts.append(read_text_file(path))
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError("the training data holds no text (every file or line is empty)")
    return texts


def fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """A short hash of the token ids: resuming checks it is the same data."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# --- datasets --------------------------------------------------------------------------------


class Dataset(Protocol):
    def __len__(self) -> int: ...

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The rows `indices` as tensors (rows, positions)."""
        ...

    def fingerprint(self) -> str: ...


class PackedTokens:
    """Rows of `length` positions cut from one stream of token ids, with no padding.

    Row i takes tokens [i*length, (i+1)*length] of the stream: `length` inputs, each predicting
    the token after it (so neighbouring rows share one token). `targets` (bool, like the stream)
    says which tokens are predicted at all: every one for pretraining, only the answers of packed
    fine-tuning examples.
    """

    def __init__(self, stream: torch.Tensor, length: int, targets: torch.Tensor | None = None) -> None:
        self.stream = stream
        self.targets = torch.ones_like(stream, dtype=torch.bool) if targets is None else targets
        self.length = length

    def __len__(self) -> int:
        return max(0, (len(self.stream) - 1) // self.length)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        starts = torch.tensor(indices)[:, None] * self.length
        window = starts + torch.arange(self.length + 1)  # (rows, length + 1)
        ids, targets = self.stream[window], self.targets[window]
        labels = ids[:, 1:].masked_fill(~targets[:, 1:], IGNORE)
        return {"tokens": ids[:, :-1], "labels": labels, "real": torch.ones_like(labels, dtype=torch.bool)}

    def split(self, rows: int) -> tuple[PackedTokens, PackedTokens]:
        """The first len - rows rows, and the last `rows` rows (the held-out part)."""
        cut = (len(self) - rows) * self.length
        return (
            PackedTokens(self.stream[: cut + 1], self.length, self.targets[: cut + 1]),
            PackedTokens(self.stream[cut:], self.length, self.targets[cut:]),
        )

    def fingerprint(self) -> str:
        return fingerprint([self.stream, self.targets, torch.tensor([self.length])])


@dataclass(frozen=True)
class Example:
    """One training example as token ids: `ids` (the decoder's whole sequence) and `targets`
    (bool, same length: which ids the model is taught to predict). An encoder-decoder example
    also has `source`, the encoder's input."""

    ids: list[int]
    targets: list[bool]
    source: list[int] | None = None


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    longest = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (longest - len(r)) for r in rows])


def _real(lengths: list[int]) -> torch.Tensor:
    """(rows, longest): True at the first `length` positions of each row."""
    return torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]


class PaddedExamples:
    """One example per row of a decoder-only model; each micro-batch is padded on the right to its
    longest row. A causal model never attends to later positions, so right padding changes no
    real token's output and needs no attention mask; padded positions take no loss."""

    def __init__(self, examples: list[Example], pad_id: int) -> None:
        self.examples = examples
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        chosen = [self.examples[i] for i in indices]
        ids = _pad([e.ids for e in chosen], self.pad_id)
        targets = _pad([[int(t) for t in e.targets] for e in chosen], 0).bool()
        labels = ids[:, 1:].masked_fill(~targets[:, 1:], IGNORE)
        return {"tokens": ids[:, :-1], "labels": labels, "real": _real([len(e.ids) - 1 for e in chosen])}

    def fingerprint(self) -> str:
        return fingerprint([torch.tensor(e.ids + [-1] + [int(t) for t in e.targets]) for e in self.examples])


class Seq2SeqExamples:
    """Encoder-decoder examples: the source padded (with a mask) for the encoder; the decoder reads
    its start token then the target, each position predicting the next target token."""

    def __init__(self, examples: list[Example], pad_id: int, start_id: int) -> None:
        self.examples = examples
        self.pad_id = pad_id
        self.start_id = start_id

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        chosen = [self.examples[i] for i in indices]
        source = _pad([e.source for e in chosen], self.pad_id)
        source_mask = _real([len(e.source) for e in chosen])
        decoder = _pad([[self.start_id] + e.ids[:-1] for e in chosen], self.pad_id)
        labels = _pad([[i if t else IGNORE for i, t in zip(e.ids, e.targets)] for e in chosen], IGNORE)
        real = _real([len(e.ids) for e in chosen])
        return {"source": source, "source_mask": source_mask, "tokens": decoder, "labels": labels, "real": real}

    def fingerprint(self) -> str:
        return fingerprint([torch.tensor(e.source + [-1] + e.ids) for e in self.examples])


def pack_examples(examples: list[Example], length: int, eos_id: int | None) -> PackedTokens:
    """Fine-tuning examples end to end in one stream (an end-of-text token between them), cut
    into rows of `length`: no padding, but an example may see the one before it in its row."""
    ids: list[int] = []
    targets: list[bool] = []
    for example in examples:
        ids += example.ids
        targets += example.targets
        if eos_id is not None and example.ids[-1] != eos_id:
            ids.append(eos_id)
            targets.append(False)
    return PackedTokens(torch.tensor(ids), length, torch.tensor(targets))


# --- the order -------------------------------------------------------------------------------


class GlobalOrder:
    """Which rows form each optimizer step's global batch.

    Epoch e visits every row once in a permutation drawn from a generator seeded with (seed, e);
    step s takes positions [s*B, (s+1)*B) of the epochs laid end to end. Each process then takes
    its own contiguous share of the global batch and splits it into micro-batches.
    """

    def __init__(self, rows: int, batch_size: int, seed: int) -> None:
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self._epoch, self._permutation = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._permutation = epoch, torch.randperm(self.rows, generator=generator)
        return self._permutation

    def step(self, step: int) -> list[int]:
        """The global batch of optimizer step `step` (0-based)."""
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [int(self.permutation(p // self.rows)[p % self.rows]) for p in positions]

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.rows


def shard(global_batch: list[int], rank: int, world_size: int, micro_batch: int) -> list[list[int]]:
    """This process's share of a global batch, as micro-batches."""
    share = len(global_batch) // world_size
    mine = global_batch[rank * share : (rank + 1) * share]
    return [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]
