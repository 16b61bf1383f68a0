"""An index of documents: a store (store.py) and the encoder that embeds its chunks.

`Index.open(db)` opens (or creates) the SQLite index in one file; `update(folder)` brings it up to
date with a folder, reading only files whose size or modification time changed (and re-embedding
only those whose text changed), forgetting files that are gone, all in one transaction: a run that
fails or is interrupted leaves the index as it was. `search` (search.py) queries it.

    index = Index.open("notes.db")                 # the encoder the index was built with
    report = index.update("docs/")                 # UpdateReport(added, changed, unchanged, removed, chunks)
    passages = index.search("What is RLHF?", top_k=4)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attendo.errors import AttendoError
from attendo.retrieval.chunking import Document, chunk_text, find_documents, validate_chunking
from attendo.retrieval.store import Chunk, Fingerprint, IndexSettings, RetrievalError, Store

DEFAULT_ENCODER = "all-minilm-l6-v2"
DEFAULT_CHUNK_TOKENS = 64
DEFAULT_OVERLAP = 16
EMBED_BATCH = 32


@dataclass
class UpdateReport:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    touched: list[str] = field(default_factory=list)  # newer mtime, same text: not re-embedded
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "path: why", files that could not be read as text
    chunks: int = 0  # chunks embedded in this update


class Progress:
    """What an update reports as it goes (the CLI draws bars from it); the default says nothing."""

    def files(self, total: int) -> None: ...
    def file_done(self, source: str) -> None: ...
    def chunks(self, added: int) -> None: ...
    def chunk_done(self, count: int) -> None: ...


def encoder_length(encoder: Any) -> int:
    """How many tokens the encoder embeds (its pooling's max length, capped by its context)."""
    pooling = getattr(encoder, "pooling", None)
    limit = getattr(pooling, "max_length", None) or encoder.config.context_length
    return min(limit, encoder.config.context_length) - encoder.tokenizer.backend.num_special_tokens_to_add(is_pair=False)


class Index:
    def __init__(self, store: Store, encoder: Any, encoder_name: str) -> None:
        self.store = store
        self.encoder = encoder
        self.encoder_name = encoder_name
        self.dimension = int(encoder.embed(["dimension"]).shape[-1])
        settings = store.settings()
        if settings is not None:
            if settings.encoder != encoder_name:
                raise RetrievalError(
                    f"this index was built with the encoder {settings.encoder!r}, not {encoder_name!r}: "
                    f"query it with {settings.encoder!r}, or index into a new file"
                )
            if settings.dimension != self.dimension:
                raise RetrievalError(
                    f"this index holds vectors of dimension {settings.dimension}, but {encoder_name!r} makes "
                    f"vectors of dimension {self.dimension}: index into a new file"
                )

    @classmethod
    def open(
        cls, path: str | Path, encoder: str | None = None, *, create: bool = False, loader: Callable[[str], Any] | None = None
    ) -> Index:
        """The index in `path` with its encoder (loaded by name; `encoder` must name the one it was
        built with). create=True makes a new index file (with `encoder`, default all-MiniLM-L6-v2)."""
        from attendo.retrieval.sqlite_store import SQLiteStore

        path = Path(path)
        if not create and not path.is_file():
            raise RetrievalError(f"no index at {path}: make one with `attendo index FOLDER --db {path}`")
        store = SQLiteStore(path)
        try:
            settings = store.settings()
            if settings is None and not create:
                raise RetrievalError(f"{path} is an empty index: fill it with `attendo index FOLDER --db {path}`")
            name = encoder or (settings.encoder if settings else DEFAULT_ENCODER)
            if settings is not None and name != settings.encoder:  # before loading a model for nothing
                raise RetrievalError(
                    f"{path} was built with the encoder {settings.encoder!r}, not {name!r}: "
                    f"use {settings.encoder!r}, or index into a new file"
                )
            load = loader or _load_encoder
            return cls(store, load(name), name)
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.encoder.embed(texts, normalize=True).float().numpy()

    def update(
        self,
        folder: str | Path,
        chunk_tokens: int | None = None,
        overlap: int | None = None,
        progress: Progress | None = None,
    ) -> UpdateReport:
        """Make the index hold exactly the text files under `folder` (others stay as they are).
        Changing chunk_tokens or overlap re-chunks every document."""
        progress = progress or Progress()
        old = self.store.settings()
        chunk_tokens = chunk_tokens or (old.chunk_tokens if old else DEFAULT_CHUNK_TOKENS)
        overlap = overlap if overlap is not None else (old.overlap if old else DEFAULT_OVERLAP)
        validate_chunking(chunk_tokens, overlap, encoder_length(self.encoder))
        settings = IndexSettings(self.encoder_name, self.dimension, chunk_tokens, overlap)
        rechunk = old is not None and (old.chunk_tokens, old.overlap) != (chunk_tokens, overlap)

        documents = find_documents(folder)
        indexed = self.store.documents()
        report = UpdateReport()
        pending: list[tuple[Document, Fingerprint, str]] = []  # to chunk and embed
        touched: list[tuple[str, Fingerprint]] = []
        progress.files(len(documents))
        for document in documents:
            known = indexed.get(document.source)
            try:
                stat = document.path.stat()
                if not rechunk and known and (known.size, known.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
                    report.unchanged.append(document.source)
                    progress.file_done(document.source)
                    continue
                data = document.path.read_bytes()
                text = data.decode("utf-8")
            except (OSError, UnicodeDecodeError) as e:
                report.skipped.append(f"{document.source}: {_reason(e)}")
                progress.file_done(document.source)
                continue
            # The size and time from before the read: a file written during it looks changed next time.
            found = Fingerprint(stat.st_size, stat.st_mtime_ns, hashlib.sha256(data).hexdigest())
            if not rechunk and known and known.sha256 == found.sha256:
                report.touched.append(document.source)
                touched.append((document.source, found))
                progress.file_done(document.source)
            else:
                pending.append((document, found, text))
                (report.changed if known else report.added).append(document.source)
        if len(report.skipped) == len(documents):
            raise RetrievalError(f"no readable text files under {folder}: {report.skipped[0]}")
        present = {d.source for d in documents}
        report.removed = [s for s in indexed if s not in present and _under(s, folder)]

        tokenizer = self.encoder.tokenizer.backend
        chunked = [(d, f, chunk_text(text, tokenizer, chunk_tokens, overlap)) for d, f, text in pending]
        progress.chunks(sum(len(chunks) for _, _, chunks in chunked))
        with self.store.writing():
            self.store.set_settings(settings)
            for source in report.removed:
                self.store.remove_document(source)
            for source, found in touched:
                self.store.touch_document(source, found)
            for document, found, chunks in chunked:
                vectors = self._embed_chunks(chunks, progress)
                self.store.put_document(document.source, found, chunks, vectors)
                report.chunks += len(chunks)
                progress.file_done(document.source)
        return report

    def _embed_chunks(self, chunks: list[Chunk], progress: Progress) -> np.ndarray:
        if not chunks:
            return np.zeros((0, self.dimension), dtype=np.float32)
        parts = []
        for start in range(0, len(chunks), EMBED_BATCH):
            batch = chunks[start : start + EMBED_BATCH]
            parts.append(self.embed([c.text for c in batch]))
            progress.chunk_done(len(batch))
        return np.concatenate(parts)

    def search(self, question: str, top_k: int = 4, mode: str = "hybrid") -> list[Any]:
        from attendo.retrieval.search import search

        return search(self, question, top_k, mode)


def _load_encoder(name: str) -> Any:
    from attendo.loader import load

    try:
        return load(name)
    except AttendoError as e:
        raise RetrievalError(f"cannot load the encoder {name!r}: {e}") from None


def _reason(error: Exception) -> str:
    if isinstance(error, UnicodeDecodeError):
        return "not UTF-8 text"
    return getattr(error, "strerror", None) or str(error)


def _under(source: str, folder: str | Path) -> bool:
    root = Path(folder).as_posix()
    return source == root or source.startswith(root.rstrip("/") + "/") or root == "."
