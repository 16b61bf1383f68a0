"""Retrieval quality: recall@k of vector-only, keyword-only and hybrid search, side by side.

    .venv/bin/python benchmarks/retrieval_recall.py [--chunks 64:16,128:32,256:64] [--k 1,3,5]

The collection ships in data/rag/docs/ (the course notes and a snapshot of attendo's README);
data/rag/questions.jsonl holds 36 questions written for it, each with the document that answers
it and a short phrase copied from the answer's place in that document. A retrieved passage is
relevant when it comes from that document and contains the phrase, so the judgement does not
depend on how the text was chunked. recall@k is the share of questions with a relevant passage
among the top k; MRR is the mean of 1 / (rank of the first relevant passage), 0 if none is in the
top 10. For each chunking (tokens:overlap) the documents are indexed afresh with the bundled
all-MiniLM-L6-v2 into a temporary file, through the same Index as `attendo index`; "findable"
counts the questions whose phrase lies whole inside some chunk (a phrase cut by a chunk boundary
can be found by no mode). JSON goes to --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data" / "rag"
MODES = ("vector", "keyword", "hybrid")
DEPTH = 10  # ranks looked at for MRR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", default=str(DATA / "docs"))
    parser.add_argument("--questions", default=str(DATA / "questions.jsonl"))
    parser.add_argument("--chunks", default="64:16,128:32,256:64", help="chunk_tokens:overlap settings to compare")
    parser.add_argument("--k", default="1,3,5")
    parser.add_argument("--out", default="benchmarks/results/retrieval_recall.json")
    args = parser.parse_args()

    from attendo.retrieval.index import Index

    questions = [json.loads(line) for line in Path(args.questions).read_text().splitlines() if line.strip()]
    ks = [int(k) for k in args.k.split(",")]
    rows = []
    for setting in args.chunks.split(","):
        chunk_tokens, overlap = (int(n) for n in setting.split(":"))
        with tempfile.TemporaryDirectory() as scratch, Index.open(Path(scratch) / "index.db", create=True) as index:
            report = index.update(args.docs, chunk_tokens, overlap)
            every = index.store.vector_search(index.embed(["any"])[0], index.store.count())  # exact: all chunks
            chunks = index.store.chunks([h.chunk_id for h in every]).values()
            findable = sum(any(q["answer"] in c.chunk.text for c in chunks) for q in questions)
            for mode in MODES:
                first_relevant = []
                for q in questions:
                    passages = index.search(q["question"], top_k=DEPTH, mode=mode)
                    ranks = [r for r, p in enumerate(passages, 1) if p.source.endswith("/" + q["source"]) and q["answer"] in p.text]
                    first_relevant.append(ranks[0] if ranks else None)
                row = {"chunk_tokens": chunk_tokens, "overlap": overlap, "chunks": report.chunks, "findable": findable,
                       "mode": mode, "mrr": sum(1 / r for r in first_relevant if r) / len(questions)}  # fmt: skip
                row.update({f"recall@{k}": sum(1 for r in first_relevant if r and r <= k) / len(questions) for k in ks})
                rows.append(row)
                print(json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"questions": len(questions), "rows": rows}, indent=2) + "\n")
    header = "| chunk tokens:overlap (chunks) | mode | " + " | ".join(f"recall@{k}" for k in ks) + " | MRR |"
    print(header)
    print("|---|---|" + "---:|" * (len(ks) + 1))
    for r in rows:
        recalls = " | ".join(f"{r[f'recall@{k}']:.2f}" for k in ks)
        print(f"| {r['chunk_tokens']}:{r['overlap']} ({r['chunks']}, {r['findable']}/{len(questions)} findable) | {r['mode']} | {recalls} | {r['mrr']:.2f} |")


if __name__ == "__main__":
    main()
