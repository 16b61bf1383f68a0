"""`attendo index` (a folder into an index file, with progress bars) and `attendo ask` (hybrid
retrieval, the passages with sources and scores, and an answer that cites them)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from attendo.cli import add_generation_options, add_model_options, check_complete, generation_settings, load_model


def cmd_index(args: argparse.Namespace) -> None:
    from rich.console import Console

    from attendo.retrieval.chunking import find_documents
    from attendo.retrieval.index import Index

    find_documents(args.folder)  # a folder with nothing to index fails before any model loads
    console = Console(stderr=True)
    db = Path(args.db)
    new = not db.exists()
    try:
        with Index.open(db, args.model, create=True) as index, _Bars(console) as progress:
            report = index.update(args.folder, args.chunk_tokens, args.overlap, progress)
            total = index.store.count()
    except BaseException:
        if new:  # a failed first run leaves no file behind
            for leftover in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
                leftover.unlink(missing_ok=True)
        raise
    for skipped in report.skipped:
        console.print(f"[yellow]skipped[/] {skipped}", highlight=False)
    counts = [f"{len(report.added)} added", f"{len(report.changed)} changed",
              f"{len(report.unchanged) + len(report.touched)} unchanged", f"{len(report.removed)} removed"]  # fmt: skip
    print(f"{db}: {', '.join(counts)}; {report.chunks} chunks embedded, {total} in the index")


class _Bars:
    """Two rich progress bars, files and chunks, fed by Index.update (see index.Progress)."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bars = Progress(TextColumn("{task.description:>6}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=console, transient=not console.is_terminal)  # fmt: skip
        self.file_task = self.bars.add_task("files", total=None)
        self.chunk_task = self.bars.add_task("chunks", total=0)

    def __enter__(self) -> _Bars:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def files(self, total: int) -> None:
        self.bars.update(self.file_task, total=total)

    def file_done(self, source: str) -> None:
        self.bars.advance(self.file_task)

    def chunks(self, added: int) -> None:
        self.bars.update(self.chunk_task, total=added)

    def chunk_done(self, count: int) -> None:
        self.bars.advance(self.chunk_task, count)


def show_passages(passages: list[Any], console: Any) -> None:
    """Each passage: its number for citing, source and scores, then its text (shortened)."""
    from rich.padding import Padding
    from rich.text import Text

    for number, p in enumerate(passages, 1):
        scores = f"score {p.score:.4f} (cosine {_optional(p.vector_score)}, keywords {_optional(p.keyword_score)})"
        console.print(Text.assemble((f"[{number}] ", "bold"), (p.source, "cyan"), "  ", (scores, "dim")))
        text = " ".join(p.text.split())
        console.print(Padding(Text(text if len(text) <= 300 else text[:300] + "…"), (0, 0, 0, 4)))


def _optional(score: float | None) -> str:
    return "-" if score is None else f"{score:.3f}"


def cmd_ask(args: argparse.Namespace) -> None:
    from rich.console import Console

    from attendo.prompting.commands import show_prompt, stream_completion
    from attendo.prompting.templates import PromptTemplate, complete
    from attendo.retrieval.answer import Answer, retrieve_prompt
    from attendo.retrieval.index import Index

    template = PromptTemplate.from_file(args.template) if args.template else None
    with Index.open(args.db) as index:
        model = load_model(args)
        passages, prompt = retrieve_prompt(model, index, args.question, args.passages, args.mode, template, args.max_new_tokens)
    console = Console(stderr=True)
    if not args.json:
        show_passages(passages, console)
    if args.show_prompt:
        show_prompt(prompt)
    settings = generation_settings(args, model)
    if args.json:
        result = complete(model, prompt, max_new_tokens=args.max_new_tokens, stop=args.stop, **settings)
        print(json.dumps(Answer(result.text, passages, prompt).as_dict(), ensure_ascii=False))
        check_complete(result, settings)
        return
    stream_completion(model, prompt, max_new_tokens=args.max_new_tokens, stop=args.stop, **settings)


def register(commands: Any) -> None:
    from attendo.retrieval.index import DEFAULT_CHUNK_TOKENS, DEFAULT_ENCODER, DEFAULT_OVERLAP
    from attendo.retrieval.search import MODES

    p = commands.add_parser("index", help="index a folder of text and Markdown files for `attendo ask`")
    p.add_argument("folder", metavar="DIR", help="the folder (or one file) to index")
    p.add_argument("--db", required=True, metavar="FILE", help="the index file (SQLite), made if missing")
    p.add_argument("--model", "-m", default=None,
                   help=f"the encoder that embeds the chunks (default: the index's own, {DEFAULT_ENCODER} for a new one)")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help=f"tokens per chunk (default: the index's own, {DEFAULT_CHUNK_TOKENS} for a new one)")
    p.add_argument("--overlap", type=int, default=None,
                   help=f"tokens a chunk shares with the one before (default: the index's own, {DEFAULT_OVERLAP})")
    p.set_defaults(run=cmd_index)

    # --top-k counts passages here; sampling's top-k becomes --sample-top-k ("resolve" lets the
    # later --top-k take the name from the generation options).
    p = commands.add_parser("ask", help="answer a question from an index, citing the passages it found", conflict_handler="resolve")
    p.add_argument("question")
    p.add_argument("--db", required=True, metavar="FILE", help="an index made by `attendo index`")
    p.add_argument("--mode", choices=MODES, default="hybrid", help="retrieve by meaning and words (hybrid, the default), or one")
    p.add_argument("--show-prompt", action="store_true", help="print the prompt with the passages and its token count (stderr)")
    p.add_argument("--json", action="store_true", help='print {"answer": ..., "passages": [...]} instead')
    p.add_argument("--template", default=None, help="a prompt template to use instead of the default (sees `passages`, `input`)")
    add_model_options(p)
    add_generation_options(p)
    p.add_argument("--top-k", "-k", dest="passages", type=int, default=4, help="passages to retrieve (default 4)")
    p.add_argument("--sample-top-k", dest="top_k", type=int, default=None, help="sample among the k most likely tokens only")
    p.set_defaults(run=cmd_ask)
