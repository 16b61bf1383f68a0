"""Retrieval over documents with the bundled all-MiniLM-L6-v2: chunking, incremental indexing,
hybrid search, answers with their passages, and `attendo index` / `attendo ask`.

Scores are checked against independent computations: cosines from the encoder's own embed(),
reciprocal rank fusion from the vector-only and keyword-only rankings.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import attendo
from attendo.cli import main
from attendo.errors import ContextLengthError
from attendo.prompting.templates import PromptTemplate, complete
from attendo.retrieval.answer import ask, retrieve_prompt
from attendo.retrieval.chunking import chunk_text, find_documents
from attendo.retrieval.index import Index
from attendo.retrieval.search import RRF_K
from attendo.retrieval.sqlite_store import SQLiteStore
from attendo.retrieval.store import IndexSettings, RetrievalError

ENCODER = "all-minilm-l6-v2"
NOTES = Path(__file__).resolve().parent.parent / "data" / "rag" / "docs" / "course-notes.md"
DOCUMENTS = {
    "attention.md": "# Attention\n\nSelf-attention lets every token weigh every other token. "
    "Multi-head attention runs several heads in parallel, each learning a different relation.",
    "training.md": "# Training\n\nPre-training reads vast amounts of text. Fine-tuning with instructions "
    "adapts a model to tasks; LoRA trains small low-rank matrices instead of all the weights.",
    "notes/quantization.txt": "Quantization stores weights in 8 or 4 bits, which shrinks memory and "
    "speeds up inference on a CPU.",
}
SHORT_TEMPLATE = "{% for p in passages %}[{{ loop.index }}] {{ p.text[:16] }}\n{% endfor %}Q: {{ input }}\nA:"


@pytest.fixture(scope="module")
def encoder():
    return attendo.load(ENCODER)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "docs"
    for name, text in DOCUMENTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def open_index(db: Path, encoder) -> Index:
    return Index(SQLiteStore(db), encoder, ENCODER)


def test_chunks_are_overlapping_token_windows_that_keep_words_whole(encoder):
    text = NOTES.read_text()[:6000]
    tokenizer = encoder.tokenizer.backend
    chunks = chunk_text(text, tokenizer, chunk_tokens=64, overlap=16)
    assert len(chunks) > 5
    assert chunks[0].start == 0 and chunks[-1].end == len(text.rstrip())
    for chunk, following in zip(chunks, chunks[1:]):
        assert following.start < chunk.end  # they overlap
        assert len(tokenizer.encode(text[following.start : chunk.end], add_special_tokens=False).ids) <= 16
    for chunk in chunks:
        assert chunk.text == text[chunk.start : chunk.end]
        assert len(tokenizer.encode(chunk.text, add_special_tokens=False).ids) <= 64
        for edge in (chunk.start, chunk.end):  # never between two letters of one word
            assert not (0 < edge < len(text) and text[edge - 1].isalnum() and text[edge].isalnum())


def test_update_reads_only_what_changed(folder, tmp_path, encoder):
    with open_index(tmp_path / "index.db", encoder) as index:
        first = index.update(folder, chunk_tokens=32, overlap=8)
        assert sorted(first.added) == sorted(f"{folder.as_posix()}/{name}" for name in DOCUMENTS)
        assert first.chunks == index.store.count() > 3
        ids_before = {p.source: p.chunk_id for p in index.search("attention heads", top_k=8, mode="keyword")}

        again = index.update(folder)
        assert (len(again.unchanged), again.chunks) == (3, 0)

        (folder / "attention.md").write_text(DOCUMENTS["attention.md"] + " Attention maps show the weights.")
        later = (folder / "training.md").stat().st_mtime_ns + 10**9
        os.utime(folder / "training.md", ns=(later, later))  # newer, same text
        (folder / "notes" / "quantization.txt").unlink()
        (folder / "new.md").write_text("Retrieval-augmented generation cites its sources.")
        (folder / "binary.md").write_bytes(b"\xff\xfe\x00bad")
        report = index.update(folder)
        source = f"{folder.as_posix()}/"
        assert report.changed == [source + "attention.md"] and report.touched == [source + "training.md"]
        assert report.removed == [source + "notes/quantization.txt"] and report.added == [source + "new.md"]
        assert report.skipped == [source + "binary.md: not UTF-8 text"]
        assert set(index.store.documents()) == {source + n for n in ("attention.md", "training.md", "new.md")}
        assert index.search("quantization bits", top_k=3, mode="keyword") == []
        assert index.store.documents()[source + "training.md"].mtime_ns == later
        training = {p.source: p.chunk_id for p in index.search("LoRA low-rank", top_k=8, mode="keyword")}
        assert training[source + "training.md"] == ids_before.get(source + "training.md", training[source + "training.md"])


def test_new_chunk_sizes_rechunk_everything(folder, tmp_path, encoder):
    with open_index(tmp_path / "index.db", encoder) as index:
        index.update(folder, chunk_tokens=64, overlap=0)
        report = index.update(folder, chunk_tokens=16, overlap=4)
        assert len(report.changed) == 3 and index.store.settings() == IndexSettings(ENCODER, 384, 16, 4)


def test_search_scores(folder, tmp_path, encoder):
    question = "How does LoRA fine-tune a model?"
    with open_index(tmp_path / "index.db", encoder) as index:
        index.update(folder, chunk_tokens=24, overlap=6)
        by_meaning = index.search(question, top_k=20, mode="vector")
        texts = [p.text for p in by_meaning]
        cosines = (encoder.embed(texts) @ encoder.embed([question])[0]).tolist()
        np.testing.assert_allclose([p.score for p in by_meaning], cosines, atol=1e-5)
        assert cosines == sorted(cosines, reverse=True)

        by_words = index.search(question, top_k=20, mode="keyword")
        words = r"\b(how|does|lora|fine|tune|a|model)"
        assert by_words and all(re.search(words, p.text.lower()) for p in by_words)

        fused: dict[int, float] = {}
        for ranking in (by_meaning, by_words):
            for rank, p in enumerate(ranking, 1):
                fused[p.chunk_id] = fused.get(p.chunk_id, 0.0) + 1 / (RRF_K + rank)
        hybrid = index.search(question, top_k=4)
        assert [p.chunk_id for p in hybrid] == sorted(fused, key=lambda i: -fused[i])[:4]
        np.testing.assert_allclose([p.score for p in hybrid], [fused[p.chunk_id] for p in hybrid])
        assert "LoRA" in hybrid[0].text and hybrid[0].source.endswith("training.md")


def test_an_interrupted_update_leaves_the_index_as_it_was(folder, tmp_path, encoder):
    class FailingEncoder:  # the real encoder, until the second batch of chunks
        def __init__(self) -> None:
            self.calls = 0

        def __getattr__(self, name):
            return getattr(encoder, name)

        def embed(self, texts, **kwargs):
            self.calls += 1
            if self.calls > 2:  # the first call measures the dimension, the second embeds a file
                raise KeyboardInterrupt
            return encoder.embed(texts, **kwargs)

    db = tmp_path / "index.db"
    with open_index(db, encoder) as index:
        index.update(folder, chunk_tokens=32, overlap=8)
        before = (index.store.documents(), index.store.count())
    for name in DOCUMENTS:
        (folder / name).write_text(DOCUMENTS[name] + " Changed.")
    with Index(SQLiteStore(db), FailingEncoder(), ENCODER) as failing, pytest.raises(KeyboardInterrupt):
        failing.update(folder)
    with open_index(db, encoder) as index:
        assert (index.store.documents(), index.store.count()) == before


def test_an_index_answers_only_to_its_own_encoder(folder, tmp_path, encoder):
    db = tmp_path / "index.db"
    with open_index(db, encoder) as index:
        index.update(folder)
    with pytest.raises(RetrievalError, match="built with the encoder 'all-minilm-l6-v2', not 'other-encoder'"):
        Index(SQLiteStore(db), encoder, "other-encoder")
    with pytest.raises(RetrievalError, match="built with the encoder 'all-minilm-l6-v2', not 'other-encoder'"):
        Index.open(db, "other-encoder")  # before loading anything
    odd = tmp_path / "odd.db"
    store = SQLiteStore(odd)
    with store.writing():
        store.set_settings(IndexSettings(ENCODER, 768, 128, 32))
    with pytest.raises(RetrievalError, match="dimension 768, but 'all-minilm-l6-v2' makes vectors of dimension 384"):
        Index(store, encoder, ENCODER)


def test_bad_folders_and_chunk_sizes(tmp_path, encoder):
    with pytest.raises(RetrievalError, match="no folder at"):
        find_documents(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "picture.png").write_bytes(b"\x89PNG")
    with pytest.raises(RetrievalError, match="no text files"):
        find_documents(tmp_path / "empty")
    (tmp_path / "undecodable").mkdir()
    (tmp_path / "undecodable" / "latin1.txt").write_bytes("café".encode("latin-1"))
    with open_index(tmp_path / "index.db", encoder) as index:
        with pytest.raises(RetrievalError, match="no readable text files .*latin1.txt: not UTF-8 text"):
            index.update(tmp_path / "undecodable")
        with pytest.raises(RetrievalError, match="more than the encoder reads"):
            index.update(tmp_path / "undecodable", chunk_tokens=1000)
        with pytest.raises(RetrievalError, match="--overlap must be between 0 and half"):
            index.update(tmp_path / "undecodable", chunk_tokens=64, overlap=40)


def test_ask_puts_numbered_passages_in_the_prompt(folder, tmp_path, encoder, tiny_llama):
    with open_index(tmp_path / "index.db", encoder) as index:
        index.update(folder, chunk_tokens=32, overlap=8)
        template = PromptTemplate(SHORT_TEMPLATE)
        passages, prompt = retrieve_prompt(tiny_llama, index, "What is LoRA?", 2, template=template, max_new_tokens=5)
        assert len(passages) == 2
        assert f"[1] {passages[0].text[:16]}\n[2] {passages[1].text[:16]}\nQ: What is LoRA?\nA:" in prompt.text
        answer = ask(tiny_llama, index, "What is LoRA?", 2, template=template, max_new_tokens=5, do_sample=False)
        assert answer.text == complete(tiny_llama, prompt, max_new_tokens=5, do_sample=False).text
        assert answer.as_dict()["passages"][0] == {**passages[0].as_dict()}
        with pytest.raises(ContextLengthError, match="passages"):  # the default template: too long for 128 tokens
            retrieve_prompt(tiny_llama, index, "What is LoRA?", 3, max_new_tokens=5)


def test_index_and_ask_commands(folder, tmp_path, tiny_llama_dir, tiny_llama, encoder, capsys):
    db = tmp_path / "notes.db"
    assert main(["index", str(folder), "--db", str(db), "--chunk-tokens", "32", "--overlap", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{db}: 3 added, 0 changed, 0 unchanged, 0 removed;") and "in the index" in out
    template = tmp_path / "short.jinja"
    template.write_text(SHORT_TEMPLATE)
    argv = ["ask", "What is LoRA?", "--db", str(db), "--top-k", "2", "--json", "--template", str(template),
            "-m", str(tiny_llama_dir), "--greedy", "-n", "5"]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    with open_index(db, encoder) as index:
        expected = ask(tiny_llama, index, "What is LoRA?", 2, template=PromptTemplate(SHORT_TEMPLATE), max_new_tokens=5, do_sample=False)
    assert printed["answer"] == expected.text
    assert [p["source"] for p in printed["passages"]] == [p.source for p in expected.passages]
    assert set(printed["passages"][0]) >= {"source", "text", "score"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["index", "{empty}", "--db", "{db}"], "no text files"),
        (["index", "{missing}", "--db", "{db}"], "no folder at"),
        (["ask", "Why?", "--db", "{db}"], "no index at"),
        (["ask", "Why?", "--db", "{junk}"], "is not an attendo index"),
    ],
    ids=["empty-folder", "missing-folder", "missing-index", "not-an-index"],
)
def test_command_errors_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all " * 64)
    paths = {"empty": tmp_path / "empty", "missing": tmp_path / "missing", "db": tmp_path / "new.db", "junk": junk}
    assert main([a.format(**paths) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("attendo: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "new.db").exists()  # a failed run leaves no index file behind
