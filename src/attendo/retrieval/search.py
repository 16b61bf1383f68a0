"""Hybrid retrieval: the chunks nearest a question by meaning (vectors) and by words (BM25),
fused by reciprocal rank.

Why reciprocal rank fusion: the two lists score on scales that cannot be compared (a cosine in
[-1, 1] against a BM25 value that grows with the corpus and the question's length), so adding or
maxing scores needs a normalization that is wrong for some question. RRF uses only each chunk's
rank in each list: score = Σ 1 / (RRF_K + rank), over the lists the chunk appears in (rank from
1). It needs no tuning beyond the constant (60, from Cormack, Clarke and Büttcher, 2009, where it
beat learned fusion methods), rewards a chunk both lists agree on, and still lets a chunk that
only one list found (an exact name the encoder blurs, a paraphrase with no shared word) through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from attendo.errors import InvalidSettingError

RRF_K = 60
MODES = ("hybrid", "vector", "keyword")
CANDIDATES = 4  # each list offers this many times top_k candidates to the fusion (at least 20)


@dataclass(frozen=True)
class Passage:
    source: str  # the file's path as indexed
    text: str
    score: float  # higher is better: the fused RRF score (hybrid), the cosine (vector) or -BM25 (keyword)
    vector_score: float | None  # cosine similarity to the question, if the vector list found it
    keyword_score: float | None  # minus FTS5's BM25 value, if the keyword list found it
    position: int  # the chunk's number in its document
    chunk_id: int

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "text": self.text, "score": self.score,
                "vector_score": self.vector_score, "keyword_score": self.keyword_score}  # fmt: skip


def question_words(question: str) -> list[str]:
    """The words of a question, for the keyword list (punctuation and FTS5 syntax dropped)."""
    return list(dict.fromkeys(re.findall(r"\w+", question.lower())))


def reciprocal_rank_fusion(rankings: list[list[int]], k: int = RRF_K) -> dict[int, float]:
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return fused


def search(index: Any, question: str, top_k: int = 4, mode: str = "hybrid") -> list[Passage]:
    """The top_k passages for a question from an Index, best first."""
    if mode not in MODES:
        raise InvalidSettingError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InvalidSettingError(f"top_k must be an integer >= 1, got {top_k!r}")
    if not isinstance(question, str) or not question.strip():
        raise InvalidSettingError("the question is empty")
    store = index.store
    wanted = top_k if mode != "hybrid" else max(CANDIDATES * top_k, 20)
    by_vector = store.vector_search(index.embed([question])[0], wanted) if mode != "keyword" else []
    by_words = store.keyword_search(question_words(question), wanted) if mode != "vector" else []
    vector_scores = {h.chunk_id: h.score for h in by_vector}
    keyword_scores = {h.chunk_id: h.score for h in by_words}
    if mode == "hybrid":
        scores = reciprocal_rank_fusion([[h.chunk_id for h in by_vector], [h.chunk_id for h in by_words]])
    else:
        scores = vector_scores if mode == "vector" else keyword_scores
    best = sorted(scores, key=lambda i: -scores[i])[:top_k]
    stored = store.chunks(best)
    return [
        Passage(stored[i].source, stored[i].chunk.text, scores[i], vector_scores.get(i), keyword_scores.get(i),
                stored[i].position, i)
        for i in best
    ]  # fmt: skip
