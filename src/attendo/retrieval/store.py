"""The store interface: what an index of documents needs from a database.

An index keeps, for every document, its source (the file's path as indexed), a fingerprint to tell
whether it changed, and its chunks: text, where it came from, and one embedding vector each. It
answers two kinds of query, nearest vectors (cosine) and best keyword matches (BM25), and applies
changes all or nothing. `SQLiteStore` (sqlite_store.py) implements it in one file; a server-grade
store (PostgreSQL with pgvector, say) implements the same methods, and the contract tests in
tests/test_retrieval_store.py say what each must do. The README describes the PostgreSQL mapping.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np

from attendo.errors import AttendoError


class RetrievalError(AttendoError):
    """An index that cannot be read, written or used as asked."""


@dataclass(frozen=True)
class IndexSettings:
    """How an index was built; a query must embed with the same encoder."""

    encoder: str  # the encoder's name as given when indexing (a registered name or a path)
    dimension: int
    chunk_tokens: int
    overlap: int


@dataclass(frozen=True)
class Fingerprint:
    """size and mtime say cheaply that a file is unchanged; sha256 says whether a changed-looking
    file really has new text."""

    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class Chunk:
    text: str
    start: int  # character offsets of the text in its document
    end: int


@dataclass(frozen=True)
class Hit:
    chunk_id: int
    score: float  # higher is better: cosine similarity, or minus the BM25 rank value


@dataclass(frozen=True)
class StoredChunk:
    chunk_id: int
    source: str
    position: int  # the chunk's number within its document, from 0
    chunk: Chunk


class Store(ABC):
    """An index's database. Writes happen only inside `writing()`, which applies all of them or,
    if anything raises, none."""

    @abstractmethod
    def settings(self) -> IndexSettings | None:
        """None for a store nothing was written to yet."""

    @abstractmethod
    def documents(self) -> dict[str, Fingerprint]:
        """Every indexed source and its fingerprint."""

    @abstractmethod
    def writing(self) -> AbstractContextManager[None]:
        """A transaction: every change inside it lands together when it exits cleanly."""

    @abstractmethod
    def set_settings(self, settings: IndexSettings) -> None:
        """Record how the index is built (the first write sizes the vector column)."""

    @abstractmethod
    def put_document(self, source: str, fingerprint: Fingerprint, chunks: list[Chunk], vectors: np.ndarray) -> None:
        """Add a document, or replace all of an indexed one: chunks[i] has vectors[i] (n, dimension)."""

    @abstractmethod
    def touch_document(self, source: str, fingerprint: Fingerprint) -> None:
        """A document whose text is unchanged has a new fingerprint (it was touched or copied)."""

    @abstractmethod
    def remove_document(self, source: str) -> None:
        """Forget a document and its chunks."""

    @abstractmethod
    def vector_search(self, vector: np.ndarray, k: int) -> list[Hit]:
        """The k chunks whose vectors are nearest `vector` (dimension,) by cosine, best first."""

    @abstractmethod
    def keyword_search(self, words: list[str], k: int) -> list[Hit]:
        """The k chunks that best match any of `words` (BM25, stemmed), best first."""

    @abstractmethod
    def chunks(self, chunk_ids: list[int]) -> dict[int, StoredChunk]:
        """The chunks with these ids."""

    @abstractmethod
    def count(self) -> int:
        """How many chunks the index holds."""

    @abstractmethod
    def close(self) -> None: ...
