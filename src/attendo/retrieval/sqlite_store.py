"""The index in one SQLite file: chunks and sources in tables, vectors in a `sqlite-vec` vec0
table (exact cosine search), keywords in an FTS5 table (BM25 over Porter-stemmed words).

Python's own sqlite3 module can load extensions only when its Python was built with
--enable-loadable-sqlite-extensions (many are not, pyenv's included); then pysqlite3, the same
DB-API module with its own recent SQLite, is used instead.

Tables (rowids tie them together: a chunk's id is its rowid in all three chunk tables):
    meta(key, value)                        encoder, dimension, chunk_tokens, overlap
    documents(id, source, size, mtime_ns, sha256)
    chunks(id, document_id, position, start, end, text)
    chunk_words   fts5(text)                keyword search
    chunk_vectors vec0(embedding float[d] distance_metric=cosine)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from attendo.retrieval.store import Chunk, Fingerprint, Hit, IndexSettings, RetrievalError, StoredChunk, Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL UNIQUE, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, document_id INTEGER NOT NULL REFERENCES documents(id), position INTEGER NOT NULL,
    start INTEGER NOT NULL, "end" INTEGER NOT NULL, text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks(document_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunk_words USING fts5(text, tokenize = 'porter unicode61');
"""
SETTING_TYPES = {"encoder": str, "dimension": int, "chunk_tokens": int, "overlap": int}


def sqlite_module() -> Any:
    """A sqlite3 module that can load extensions: the standard one if it can, else pysqlite3."""
    if hasattr(sqlite3.Connection, "enable_load_extension"):
        return sqlite3
    try:
        import pysqlite3
    except ImportError:
        raise RetrievalError(
            "this Python's sqlite3 cannot load extensions (sqlite-vec): pip install pysqlite3"
        ) from None
    return pysqlite3


def connect(path: str | Path) -> Any:
    """A connection with sqlite-vec loaded and FTS5 checked, in autocommit mode (transactions
    are explicit, see SQLiteStore.writing)."""
    import sqlite_vec

    module = sqlite_module()
    try:
        connection = module.connect(str(path), isolation_level=None, check_same_thread=False)
    except module.Error as e:
        raise RetrievalError(f"cannot open index {path}: {e}") from None
    try:
        connection.enable_load_extension(True)
        sqlite_vec.load(connection)
        connection.enable_load_extension(False)
        connection.execute("PRAGMA journal_mode = WAL")  # readers keep reading while an index updates
    except module.Error as e:
        connection.close()
        raise RetrievalError(f"{path} is not an attendo index: {e}") from None
    return connection


class SQLiteStore(Store):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = connect(self.path)
        self._module = sqlite_module()
        try:
            self._db.executescript(SCHEMA)
            self._settings = self._read_settings()
        except self._module.DatabaseError as e:
            self._db.close()
            raise RetrievalError(f"{self.path} is not an attendo index: {e}") from None

    def _read_settings(self) -> IndexSettings | None:
        values = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if not values:
            return None
        missing = set(SETTING_TYPES) - set(values)
        if missing:
            raise RetrievalError(f"{self.path}: the index's settings lack {sorted(missing)[0]!r}")
        return IndexSettings(**{k: kind(values[k]) for k, kind in SETTING_TYPES.items()})

    def settings(self) -> IndexSettings | None:
        return self._settings

    def documents(self) -> dict[str, Fingerprint]:
        rows = self._db.execute("SELECT source, size, mtime_ns, sha256 FROM documents")
        return {source: Fingerprint(size, mtime, sha) for source, size, mtime, sha in rows}

    @contextmanager
    def writing(self) -> Iterator[None]:
        if self._db.in_transaction:
            raise RetrievalError("writing() is already open on this index")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            self._settings = self._read_settings()
            raise
        self._db.execute("COMMIT")

    def _require_writing(self) -> None:
        if not self._db.in_transaction:
            raise RetrievalError("index changes must happen inside writing()")

    def set_settings(self, settings: IndexSettings) -> None:
        self._require_writing()
        old = self._settings
        if old is not None and old.dimension != settings.dimension:
            raise RetrievalError(
                f"{self.path} holds vectors of dimension {old.dimension}, not {settings.dimension}: "
                "index into a new file"
            )
        if old is None:
            self._db.execute(
                "CREATE VIRTUAL TABLE IF NOT EXISTS chunk_vectors USING "
                f"vec0(embedding float[{int(settings.dimension)}] distance_metric=cosine)"
            )
        self._db.executemany(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
            [(key, str(getattr(settings, key))) for key in SETTING_TYPES],
        )
        self._settings = settings

    def put_document(self, source: str, fingerprint: Fingerprint, chunks: list[Chunk], vectors: np.ndarray) -> None:
        self._require_writing()
        if self._settings is None:
            raise RetrievalError("set_settings must come before the first document")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(chunks), self._settings.dimension):
            raise RetrievalError(
                f"{source}: {len(chunks)} chunks need vectors of shape ({len(chunks)}, {self._settings.dimension}), "
                f"got {tuple(vectors.shape)}"
            )
        self.remove_document(source)
        document = self._db.execute(
            "INSERT INTO documents(source, size, mtime_ns, sha256) VALUES (?, ?, ?, ?)",
            (source, fingerprint.size, fingerprint.mtime_ns, fingerprint.sha256),
        ).lastrowid
        for position, (chunk, vector) in enumerate(zip(chunks, vectors)):
            chunk_id = self._db.execute(
                'INSERT INTO chunks(document_id, position, start, "end", text) VALUES (?, ?, ?, ?, ?)',
                (document, position, chunk.start, chunk.end, chunk.text),
            ).lastrowid
            self._db.execute("INSERT INTO chunk_words(rowid, text) VALUES (?, ?)", (chunk_id, chunk.text))
            self._db.execute("INSERT INTO chunk_vectors(rowid, embedding) VALUES (?, ?)", (chunk_id, vector.tobytes()))

    def touch_document(self, source: str, fingerprint: Fingerprint) -> None:
        self._require_writing()
        self._db.execute(
            "UPDATE documents SET size = ?, mtime_ns = ?, sha256 = ? WHERE source = ?",
            (fingerprint.size, fingerprint.mtime_ns, fingerprint.sha256, source),
        )

    def remove_document(self, source: str) -> None:
        self._require_writing()
        row = self._db.execute("SELECT id FROM documents WHERE source = ?", (source,)).fetchone()
        if row is None:
            return
        ids = [(i,) for (i,) in self._db.execute("SELECT id FROM chunks WHERE document_id = ?", row)]
        self._db.executemany("DELETE FROM chunk_words WHERE rowid = ?", ids)
        self._db.executemany("DELETE FROM chunk_vectors WHERE rowid = ?", ids)
        self._db.execute("DELETE FROM chunks WHERE document_id = ?", row)
        self._db.execute("DELETE FROM documents WHERE id = ?", row)

    def vector_search(self, vector: np.ndarray, k: int) -> list[Hit]:
        if self._settings is None or k < 1:
            return []
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
        if query.shape[0] != self._settings.dimension:
            raise RetrievalError(f"a query vector of dimension {query.shape[0]} for an index of dimension {self._settings.dimension}")
        rows = self._db.execute(
            "SELECT rowid, distance FROM chunk_vectors WHERE embedding MATCH ? AND k = ? ORDER BY distance",
            (query.tobytes(), k),
        )
        return [Hit(chunk_id, 1.0 - distance) for chunk_id, distance in rows]

    def keyword_search(self, words: list[str], k: int) -> list[Hit]:
        if not words or k < 1:
            return []
        # Each word quoted (FTS5 syntax is then inert: a user's "-" or "*" means nothing), any may match.
        query = " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
        rows = self._db.execute(
            "SELECT rowid, bm25(chunk_words) FROM chunk_words WHERE chunk_words MATCH ? ORDER BY bm25(chunk_words) LIMIT ?",
            (query, k),
        )
        return [Hit(chunk_id, -rank) for chunk_id, rank in rows]  # FTS5's bm25 is lower for better matches

    def chunks(self, chunk_ids: list[int]) -> dict[int, StoredChunk]:
        if not chunk_ids:
            return {}
        marks = ",".join("?" * len(chunk_ids))
        rows = self._db.execute(
            f'SELECT c.id, d.source, c.position, c.text, c.start, c."end" FROM chunks c '
            f"JOIN documents d ON d.id = c.document_id WHERE c.id IN ({marks})",
            list(chunk_ids),
        )
        return {i: StoredChunk(i, source, position, Chunk(text, start, end)) for i, source, position, text, start, end in rows}

    def count(self) -> int:
        return self._db.execute("SELECT count(*) FROM chunks").fetchone()[0]

    def close(self) -> None:
        self._db.close()
