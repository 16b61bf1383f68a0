"""Documents to chunks: which files of a folder are read, and how their text is cut.

A chunk is a window of `chunk_tokens` tokens of the encoder's own tokenizer (so it fits what the
encoder reads), the next one starting `overlap` tokens before the last one ended, so a sentence
cut at one chunk's end is whole in the next. Windows end between words, never inside one, and a
chunk's text is the document's own characters (offsets from the tokenizer), not decoded tokens:
case, accents and layout survive.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from attendo.retrieval.store import Chunk, RetrievalError

TEXT_EXTENSIONS = frozenset(
    ".txt .text .md .markdown .mdx .rst .org .adoc .asciidoc .tex .csv .tsv .json .jsonl .yaml .yml .toml".split()
)


@dataclass(frozen=True)
class Document:
    source: str  # the path as indexed: the folder as given, joined with the file's path inside it
    path: Path


def find_documents(folder: str | Path, extensions: frozenset[str] = TEXT_EXTENSIONS) -> list[Document]:
    """The text files under `folder` (or `folder` itself, if it is a file), in a stable order;
    hidden files and folders (a name starting with ".") are skipped. None is an error."""
    root = Path(folder)
    if root.is_file():
        return [Document(root.as_posix(), root)]
    if not root.is_dir():
        raise RetrievalError(f"no folder at {folder}")
    found: list[Document] = []

    def refuse(error: OSError) -> None:
        raise RetrievalError(f"cannot read the folder {error.filename}: {error.strerror}")

    for directory, folders, files in os.walk(root, onerror=refuse):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        for name in sorted(files):
            path = Path(directory) / name
            if not name.startswith(".") and path.suffix.lower() in extensions:
                found.append(Document(path.as_posix(), path))
    if not found:
        raise RetrievalError(f"no text files ({', '.join(sorted(extensions)[:6])}, ...) under {folder}")
    return found


def validate_chunking(chunk_tokens: int, overlap: int, encoder_length: int) -> None:
    if chunk_tokens < 8:
        raise RetrievalError(f"--chunk-tokens must be at least 8, got {chunk_tokens}")
    if chunk_tokens > encoder_length:
        raise RetrievalError(
            f"--chunk-tokens {chunk_tokens} is more than the encoder reads ({encoder_length} tokens): the rest of "
            "each chunk would not be embedded"
        )
    if not 0 <= overlap < chunk_tokens // 2 + 1:
        raise RetrievalError(f"--overlap must be between 0 and half of --chunk-tokens ({chunk_tokens // 2}), got {overlap}")


def chunk_text(text: str, tokenizer: Tokenizer, chunk_tokens: int, overlap: int) -> list[Chunk]:
    """Cut `text` into windows of at most chunk_tokens tokens overlapping by about `overlap`."""
    encoding = tokenizer.encode(text, add_special_tokens=False)
    offsets, words = encoding.offsets, encoding.word_ids
    n = len(offsets)
    chunks: list[Chunk] = []
    start = 0
    while start < n:
        end = min(start + chunk_tokens, n)
        if end < n:
            end = _word_start(words, end, floor=start + 1)
        chunks.append(Chunk(text[offsets[start][0] : offsets[end - 1][1]], offsets[start][0], offsets[end - 1][1]))
        if end == n:
            break
        start = max(_word_start(words, end - overlap, floor=start + 1), start + 1)
    return chunks


def _word_start(words: list[int | None], index: int, floor: int) -> int:
    """Move `index` back to the first token of its word (a word of many tokens is not split),
    but not below floor."""
    while index > floor and words[index] is not None and words[index] == words[index - 1]:
        index -= 1
    return index
