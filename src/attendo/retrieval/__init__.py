"""Retrieval over your own documents: chunking, an index (SQLite + sqlite-vec + FTS5 behind a store
interface), hybrid search, and answers that cite their passages."""
