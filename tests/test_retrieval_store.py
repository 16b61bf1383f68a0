"""The store interface's contract (attendo.retrieval.store.Store), run against every
implementation in STORES: today the SQLite one (sqlite-vec + FTS5). A PostgreSQL/pgvector store
would add its factory to STORES and pass the same tests.

Vector search is checked against cosine similarity computed with numpy over all vectors; keyword
search against which chunks hold the words at all.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from attendo.retrieval.sqlite_store import SQLiteStore
from attendo.retrieval.store import Chunk, Fingerprint, IndexSettings, RetrievalError, Store

DIMENSION = 8
SETTINGS = IndexSettings("test-encoder", DIMENSION, 64, 16)
STORES: dict[str, Callable[[Path], Store]] = {"sqlite": lambda directory: SQLiteStore(directory / "index.db")}
TEXTS = {
    "a.md": ["Transformers use self-attention.", "Training a model takes data.", "Cats sleep a lot."],
    "b.md": ["The encoder reads the whole input.", "Quantization shrinks the weights."],
}


@pytest.fixture(params=list(STORES))
def make_store(request, tmp_path) -> Callable[[], Store]:
    """make_store() opens the store in tmp_path (again: what it holds persists)."""
    opened: list[Store] = []

    def make() -> Store:
        opened.append(STORES[request.param](tmp_path))
        return opened[-1]

    yield make
    for store in opened:
        store.close()


def vectors_for(source: str, count: int) -> np.ndarray:
    rng = np.random.default_rng(sum(map(ord, source)))
    vectors = rng.standard_normal((count, DIMENSION)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def fill(store: Store) -> None:
    with store.writing():
        store.set_settings(SETTINGS)
        for source, texts in TEXTS.items():
            chunks = [Chunk(t, i * 100, i * 100 + len(t)) for i, t in enumerate(texts)]
            store.put_document(source, Fingerprint(1, 2, source * 2), chunks, vectors_for(source, len(texts)))


def all_vectors(store: Store) -> dict[int, np.ndarray]:
    ids = [h.chunk_id for h in store.keyword_search(["a", "the", "transformers", "cats", "quantization"], 100)]
    stored = store.chunks(ids)
    found = {}
    for source, texts in TEXTS.items():
        vectors = vectors_for(source, len(texts))
        for chunk_id, chunk in stored.items():
            if chunk.source == source:
                found[chunk_id] = vectors[chunk.position]
    return found


def test_a_new_store_is_empty(make_store):
    store = make_store()
    assert store.settings() is None and store.documents() == {} and store.count() == 0
    assert store.vector_search(np.ones(DIMENSION), 3) == [] and store.keyword_search(["cats"], 3) == []


def test_documents_and_chunks_round_trip(make_store):
    store = make_store()
    fill(store)
    assert store.settings() == SETTINGS
    assert store.documents() == {s: Fingerprint(1, 2, s * 2) for s in TEXTS}
    assert store.count() == 5
    hits = store.keyword_search(["encoder"], 5)
    assert len(hits) == 1
    chunk = store.chunks([hits[0].chunk_id])[hits[0].chunk_id]
    assert (chunk.source, chunk.position, chunk.chunk) == ("b.md", 0, Chunk("The encoder reads the whole input.", 0, 34))


def test_vector_search_is_exact_cosine(make_store):
    store = make_store()
    fill(store)
    vectors = all_vectors(store)
    assert len(vectors) == 5
    query = np.random.default_rng(0).standard_normal(DIMENSION).astype(np.float32)
    cosine = {i: float(v @ query / np.linalg.norm(query)) for i, v in vectors.items()}
    expected = sorted(cosine, key=lambda i: -cosine[i])[:3]
    hits = store.vector_search(query, 3)
    assert [h.chunk_id for h in hits] == expected
    np.testing.assert_allclose([h.score for h in hits], [cosine[i] for i in expected], atol=1e-5)


def test_keyword_search_ranks_by_bm25_over_stemmed_words(make_store):
    store = make_store()
    fill(store)
    hits = store.keyword_search(["trains", "cats"], 5)  # stems: "training" and "cats" match
    texts = [store.chunks([h.chunk_id])[h.chunk_id].chunk.text for h in hits]
    assert sorted(texts) == ["Cats sleep a lot.", "Training a model takes data."]
    assert hits[0].score >= hits[1].score
    rare_and_common = store.keyword_search(["the", "quantization"], 5)
    best = store.chunks([rare_and_common[0].chunk_id])[rare_and_common[0].chunk_id]
    assert best.chunk.text == "Quantization shrinks the weights."  # the rare word outweighs "the"


def test_query_syntax_is_inert(make_store):
    store = make_store()
    fill(store)
    for words in (['"'], ["*"], ["AND"], ["-"], ["NEAR(a b)"], ["cats OR"]):
        store.keyword_search(words, 3)  # no syntax error, whatever the user typed


def test_put_replaces_and_remove_forgets(make_store):
    store = make_store()
    fill(store)
    with store.writing():
        store.put_document("a.md", Fingerprint(3, 4, "new"), [Chunk("Only dogs now.", 0, 14)], vectors_for("x", 1))
    assert store.count() == 3 and store.documents()["a.md"] == Fingerprint(3, 4, "new")
    assert store.keyword_search(["cats"], 5) == []
    assert len(store.keyword_search(["dogs"], 5)) == 1
    with store.writing():
        store.remove_document("b.md")
        store.remove_document("never-indexed.md")
    assert set(store.documents()) == {"a.md"} and store.count() == 1
    assert [h.chunk_id for h in store.vector_search(np.ones(DIMENSION), 5)] == [h.chunk_id for h in store.keyword_search(["dogs"], 5)]


def test_touch_keeps_the_chunks(make_store):
    store = make_store()
    fill(store)
    with store.writing():
        store.touch_document("a.md", Fingerprint(9, 9, "a.mda.md"))
    assert store.documents()["a.md"] == Fingerprint(9, 9, "a.mda.md") and store.count() == 5


def test_a_failed_write_changes_nothing(make_store):
    store = make_store()
    fill(store)
    before = (store.documents(), store.count(), store.vector_search(np.ones(DIMENSION), 5))
    with pytest.raises(KeyboardInterrupt):
        with store.writing():
            store.remove_document("a.md")
            store.put_document("c.md", Fingerprint(1, 1, "c"), [Chunk("More text.", 0, 10)], vectors_for("c", 1))
            raise KeyboardInterrupt
    assert (store.documents(), store.count(), store.vector_search(np.ones(DIMENSION), 5)) == before
    assert make_store().documents() == before[0]  # and so does a second reader


def test_writes_need_a_transaction_and_the_right_shapes(make_store):
    store = make_store()
    with pytest.raises(RetrievalError, match="inside writing"):
        store.set_settings(SETTINGS)
    with pytest.raises(RetrievalError, match="set_settings must come before"):
        with store.writing():
            store.put_document("a.md", Fingerprint(1, 1, "a"), [Chunk("x", 0, 1)], vectors_for("a", 1))
    fill(store)
    with pytest.raises(RetrievalError, match=r"need vectors of shape \(1, 8\)"):
        with store.writing():
            store.put_document("a.md", Fingerprint(1, 1, "a"), [Chunk("x", 0, 1)], np.ones((1, 4)))
    with pytest.raises(RetrievalError, match="dimension 8, not 16"):
        with store.writing():
            store.set_settings(IndexSettings("other", 16, 64, 16))
    with pytest.raises(RetrievalError, match="dimension 3"):
        store.vector_search(np.ones(3), 2)
    assert store.count() == 5


def test_what_was_written_persists(make_store):
    fill(make_store())
    again = make_store()
    assert again.settings() == SETTINGS and again.count() == 5 and set(again.documents()) == set(TEXTS)


def test_a_file_that_is_not_an_index(tmp_path):
    path = tmp_path / "index.db"
    path.write_bytes(b"this is not a database, just some bytes " * 100)
    with pytest.raises(RetrievalError, match="is not an attendo index"):
        SQLiteStore(path)
