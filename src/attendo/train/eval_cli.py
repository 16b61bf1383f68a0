"""`attendo eval`: measure one model, or compare several runs side by side in one table.

A run is the command line with some settings changed: the model, its adapter and dtype, and any
generation setting. Runs come from repeated --model and --adapter flags and --vary SETTING=A,B
(every combination, in that order), or from a --runs JSON file listing them. Each run is scored
on the same data: perplexity of a text (--perplexity) or answers to prompts scored against
references (--data; see attendo.train.evaluate). The table goes to the terminal; --out writes
JSON (with every answer) or CSV; --json prints one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attendo.cli import UsageError, add_generation_options, generation_settings, load_model
from attendo.datafiles import read_json
from attendo.errors import DataError
from attendo.registry import DEFAULT_MODEL


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes", "on"):
        return True
    if str(value).lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _adapter(value: Any) -> str | None:
    return None if value in (None, "", "none") else str(value)


_optional = _adapter  # a file setting that "none" turns off


# What a run may change (the option names' argparse destinations) and how a value is read.
RUN_SETTINGS: dict[str, Callable[[Any], Any]] = {
    "model": str, "adapter": _adapter, "dtype": str, "chat": _flag,
    "max_new_tokens": int, "greedy": _flag, "temperature": float, "top_k": int, "top_p": float, "min_p": float,
    "repetition_penalty": float, "seed": int, "num_beams": int, "length_penalty": float,
    "no_repeat_ngram_size": int, "json_schema": _optional, "regex": _optional,
    "template": _optional, "examples": _optional, "shots": int, "shots_seed": int, "completion": _flag,
}  # fmt: skip
_SAMPLING = ("temperature", "top_k", "top_p", "min_p")
# Metrics where lower is better (the table marks the best run of each column).
_LOWER_IS_BETTER = {"perplexity", "nll"}


@dataclass
class Run:
    name: str
    options: argparse.Namespace  # the command line with this run's settings in place
    changes: dict[str, Any]
    metrics: dict[str, float | int] | None = None
    answers: list[str] | None = None
    prompting: tuple[Any, list[Any]] | None = None  # (PromptTemplate, few-shot examples) when templated


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "eval", help="perplexity of a text, or ROUGE / exact match against references; compare models, adapters, settings",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )  # fmt: skip
    p.add_argument("--model", "-m", action="append", default=None,
                   help=f"name, directory or .gguf file (repeatable: one run per model; default {DEFAULT_MODEL})")
    p.add_argument("--adapter", action="append", default=None,
                   help="a PEFT LoRA adapter directory (repeatable: one run per adapter; 'none' is the base model alone)")
    p.add_argument("--dtype", default=None, help="weights in memory, as for generate")
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument("--perplexity", metavar="TEXT", help="a text file, or a folder of .txt/.md files, to score")
    task.add_argument("--data", metavar="DATA.jsonl", help='prompts and references: {"prompt", "reference"} or {"messages"} per line')
    p.add_argument("--window", type=int, default=None, help="perplexity: tokens per window (default min(context, 1024))")
    p.add_argument("--stride", type=int, default=None, help="perplexity: tokens between window starts (default window / 2)")
    p.add_argument("--chat", action="store_true", help="data: wrap each prompt in the model's chat template as a user message")
    p.add_argument("--match-regex", default=None, metavar="PATTERN",
                   help="data: also report regex_match, the share of answers in which this pattern is found")
    p.add_argument("--valid-json", action="store_true", help="data: also report json_valid, the share of answers that are valid JSON")
    t = p.add_argument_group("prompts (data)", "lay each prompt out with a template and few-shot examples (see attendo prompt)")
    t.add_argument("--template", default=None, metavar="FILE", help="a Jinja prompt template; the example's prompt is its `input`")
    t.add_argument("--examples", default=None, metavar="FILE.jsonl", help='few-shot examples, one {"input", "output"} per line')
    t.add_argument("--shots", type=int, default=None, metavar="K", help="how many examples (default: all); --vary shots=0,1,5 compares")
    t.add_argument("--shots-seed", type=int, default=None, metavar="SEED", help="take the examples at random with this seed")
    t.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="a template variable (repeatable)")
    t.add_argument("--completion", action="store_true", help="lay the prompt out as plain text even for a chat model")
    p.add_argument("--batch-size", type=int, default=8, help="data: prompts generated together (default 8)")
    p.add_argument("--limit", type=int, default=None, help="data: only the first N examples")
    p.add_argument("--vary", action="append", default=[], metavar="SETTING=A,B,...",
                   help=f"one run per value, in every combination (settings: {', '.join(RUN_SETTINGS)})")
    p.add_argument("--runs", default=None, metavar="RUNS.json",
                   help='a JSON list of runs, each an object of settings (and an optional "name"), instead of the flags')
    p.add_argument("--out", default=None, metavar="FILE", help="also write the results: .json (with every answer) or .csv")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_generation_options(p)
    p.set_defaults(run=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> None:
    from attendo.train import evaluate, perplexity

    if args.out and Path(args.out).suffix not in (".json", ".csv"):
        raise UsageError("--out must name a .json or .csv file")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UsageError("--batch-size and --limit must be at least 1")
    checks = evaluate.Checks(_pattern(args.match_regex), args.valid_json)
    runs = build_runs(args)
    for run in runs:
        run.prompting = _prompting(run.options)
    if args.perplexity:
        text = perplexity.read_text(args.perplexity)
        for run, model in _models(runs):
            run.metrics = perplexity.perplexity(model, text, run.options.window, run.options.stride).to_dict()
    else:
        examples = evaluate.read_examples(args.data)[: args.limit]
        references = [e.reference for e in examples]
        for run, model in _models(runs):
            prompts, stops = _prompts(run, model, examples, args.data)
            generate = _generate_options(run.options, model)
            generate["stop"] = [*(generate["stop"] or []), *stops]
            with _progress(run.name, len(prompts), quiet=args.json) as advance:
                answers = evaluate.answer(model, prompts, args.batch_size, generate, advance)
            run.answers = answers.texts
            run.metrics = {
                **evaluate.score(answers.texts, references, checks),
                "examples": len(examples),
                "tokens": answers.tokens,
                "seconds": round(answers.seconds, 2),
            }
    if args.out:
        write_results(Path(args.out), runs, args, examples if args.data else None)
    if args.json:
        print(json.dumps(runs[0].metrics if len(runs) == 1 else {"runs": [{"name": r.name, **r.metrics} for r in runs]}))
    else:
        _print_table(runs, args)


def build_runs(args: argparse.Namespace) -> list[Run]:
    """The runs the flags (or the --runs file) ask for, each with its own copy of the options."""
    if args.runs:
        if args.vary or (args.model and len(args.model) > 1) or (args.adapter and len(args.adapter) > 1):
            raise UsageError("give the runs either in --runs or with repeated --model/--adapter and --vary, not both")
        changes = _read_runs_file(Path(args.runs))
    else:
        axes = {"model": args.model or [DEFAULT_MODEL], "adapter": [_adapter(a) for a in args.adapter or [None]]}
        for spec in args.vary:
            name, values = _vary(spec)
            if name in axes:
                raise UsageError(f"--vary {name} given twice (repeat --model/--adapter instead of varying them)")
            axes[name] = values
        changes = [dict(zip(axes, combination)) for combination in itertools.product(*axes.values())]
    first = {"model": (args.model or [DEFAULT_MODEL])[0], "adapter": _adapter((args.adapter or [None])[0])}
    runs = []
    for change in changes:
        options = argparse.Namespace(**{**vars(args), **first, **{k: v for k, v in change.items() if k != "name"}})
        runs.append(Run(change.get("name", ""), options, change))
    varied = [k for k in RUN_SETTINGS if len({repr(getattr(r.options, k)) for r in runs}) > 1]
    for run in runs:
        run.name = run.name or _run_name(run.options, varied)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UsageError(f"two runs are both named {next(n for n in names if names.count(n) > 1)!r}")
    return runs


def _vary(spec: str) -> tuple[str, list[Any]]:
    name, sep, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not values:
        raise UsageError(f"--vary {spec!r}: expected SETTING=VALUE,VALUE,...")
    return name, [_setting(name, v.strip(), f"--vary {spec!r}") for v in values.split(",")]


def _setting(name: str, value: Any, where: str) -> Any:
    if name not in RUN_SETTINGS:
        raise UsageError(f"{where}: unknown setting {name!r} (settings: {', '.join(RUN_SETTINGS)})")
    try:
        return RUN_SETTINGS[name](value)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{where}: {name} {value!r} is not valid ({e})") from None


def _read_runs_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    runs = read_json(path)
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
        raise DataError(f"{path}: expected a non-empty JSON list of objects, one per run")
    checked = []
    for number, run in enumerate(runs, 1):
        where = f"{path}: run {number}"
        settings = {k.replace("-", "_"): _setting(k.replace("-", "_"), v, where) for k, v in run.items() if k != "name"}
        checked.append({**settings, **({"name": str(run["name"])} if "name" in run else {})})
    return checked


def _run_name(options: argparse.Namespace, varied: list[str]) -> str:
    """What sets the run apart from the others (the table's title names what they share)."""
    parts = []
    for key in varied:
        value = getattr(options, key)
        if key == "model":
            parts.append(Path(value).name)
        elif key == "adapter":
            parts.append(f"+ {Path(value).name}" if value else "base")
        elif key in ("template", "examples", "json_schema"):
            parts.append(f"{key}={Path(value).name if value else 'none'}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts) or _model_label(options)


def _model_label(options: argparse.Namespace) -> str:
    return Path(options.model).name + (f" + {Path(options.adapter).name}" if options.adapter else "")


def _models(runs: list[Run]) -> Iterator[tuple[Run, Any]]:
    """(run, model) for every run; runs in a row on the same model, adapter and dtype share one load."""
    loaded_key, model = None, None
    for run in runs:
        o = run.options
        key = (o.model, o.adapter, o.dtype, o.fast, o.fast_weights)
        if key != loaded_key:
            model = None  # let the previous one go before the next loads
            model, loaded_key = load_model(o), key
        yield run, model


def _prompting(options: argparse.Namespace) -> tuple[Any, list[Any]] | None:
    """The run's template (an empty one when only examples are given: they and the prompt then
    follow as turns) and its few-shot examples; None when the run sends prompts as they are.
    Read and checked before any model loads."""
    if options.template is None and options.examples is None:
        if options.shots:
            raise UsageError("--shots needs --examples FILE.jsonl")
        return None
    from attendo.prompting.templates import PromptTemplate, choose_examples, read_examples

    template = PromptTemplate.from_file(options.template) if options.template else PromptTemplate("", "(no template)")
    chosen = []
    if options.examples is not None:
        pool = read_examples(options.examples)
        chosen = choose_examples(pool, len(pool) if options.shots is None else options.shots, options.shots_seed)
    elif options.shots:
        raise UsageError("--shots needs --examples FILE.jsonl")
    return template, chosen


def _prompts(run: Run, model: Any, examples: list[Any], data: str) -> tuple[list[str | list[int]], list[str]]:
    """Every example's prompt for this run, and the stop strings its layout adds (a text layout
    of turns ends an answer where the next "Input:" would start)."""
    if run.prompting is None:
        return [e.prompt_for(model, run.options.chat) for e in examples], []
    from attendo.prompting.commands import parse_variables
    from attendo.prompting.templates import render_prompt

    template, shots = run.prompting
    variables = parse_variables(run.options.var)
    rendered = []
    for e in examples:
        if e.prompt is None:
            raise UsageError(f'{data}:{e.line}: a conversation ("messages") cannot be laid out with a template or examples')
        chat = False if run.options.completion else None
        rendered.append(render_prompt(model, template, variables, shots, e.prompt, chat, run.options.max_new_tokens))
    return [r.token_ids for r in rendered], list(rendered[0].stop)


def _generate_options(options: argparse.Namespace, model: Any) -> dict[str, Any]:
    """Model.generate's arguments for one run. Evaluation decodes greedily unless a sampling
    setting is given, and a sampled run is seeded (default 0) so that it can be repeated."""
    options = argparse.Namespace(**vars(options))
    sampling = any(getattr(options, k) is not None for k in _SAMPLING)
    if not sampling:
        options.greedy = True
    elif options.seed is None:
        options.seed = 0
    return {"max_new_tokens": options.max_new_tokens, "stop": options.stop, **generation_settings(options, model)}


def _pattern(regex: str | None) -> re.Pattern[str] | None:
    if regex is None:
        return None
    try:
        return re.compile(regex)
    except re.error as e:
        raise UsageError(f"--match-regex {regex!r} is not a valid regular expression ({e})") from None


@contextmanager
def _progress(name: str, total: int, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A transient progress bar on standard error while a run generates; yields advance(n)."""
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True, disable=quiet) as progress:
        task = progress.add_task(name, total=total)
        yield lambda n: progress.advance(task, n)


def _metric_names(runs: Sequence[Run]) -> list[str]:
    return list(dict.fromkeys(k for r in runs for k in r.metrics or {}))


# Short column headings, so that a comparison fits an 80-column terminal (JSON and CSV use the names).
_HEADINGS = {"exact_match": "exact", "regex_match": "regex", "json_valid": "json", "seconds": "sec"}
_NOT_RANKED = ("tokens", "windows", "seconds")


def _print_table(runs: list[Run], args: argparse.Namespace) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    names = [n for n in _metric_names(runs) if n != "examples"]
    if args.perplexity:
        title = f"perplexity of {args.perplexity}"
    else:
        title = f"answers to {runs[0].metrics['examples']} prompts of {args.data}"
    labels = {_model_label(r.options) for r in runs}  # every run on one model (and adapter): say it once
    models = {Path(r.options.model).name for r in runs}
    shared = labels.pop() if len(labels) == 1 else models.pop() if len(models) == 1 else None
    title = f"attendo eval of {shared}: {title}" if shared else f"attendo eval: {title}"
    shortened = [f"{_HEADINGS[n]} = {n}" for n in names if n in _HEADINGS and n != "seconds"]
    table = Table(title=title, caption="; ".join(shortened) or None, box=box.SIMPLE_HEAD)
    table.add_column("run", min_width=min(16, max(len(r.name) for r in runs)))
    best = {}
    for name in names:
        heading = _HEADINGS.get(name, name)
        table.add_column(heading, justify="right", no_wrap=True, min_width=len(heading))
        if len(runs) > 1 and name not in _NOT_RANKED:
            values = [r.metrics[name] for r in runs]
            best[name] = min(values) if name in _LOWER_IS_BETTER else max(values)
    for run in runs:
        cells = []
        for name in names:
            value = run.metrics[name]
            text = str(value) if not isinstance(value, float) or name == "seconds" else f"{value:.4f}" if value > 1 else f"{value:.3f}"
            cells.append(f"[bold]{text}[/bold]" if name in best and value == best[name] else text)
        table.add_row(run.name, *cells)
    Console().print(table)


def write_results(path: Path, runs: list[Run], args: argparse.Namespace, examples: list[Any] | None) -> None:
    """JSON: every run's settings, metrics and answers; CSV: one row of settings and metrics per run."""
    settings = sorted({k for r in runs for k in r.changes if k != "name"} | {"model", "adapter"})
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        document = {
            "task": "perplexity" if args.perplexity else "data",
            "source": args.perplexity or args.data,
            "runs": [
                {
                    "name": r.name,
                    "settings": {k: getattr(r.options, k) for k in settings},
                    "metrics": r.metrics,
                    **({"answers": [
                        {"line": e.line, "prompt": e.prompt, "messages": list(e.messages) or None, "reference": e.reference, "answer": a}
                        for e, a in zip(examples, r.answers)
                    ]} if examples is not None else {}),
                }
                for r in runs
            ],
        }  # fmt: skip
        path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        names = _metric_names(runs)
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["name", *settings, *names])
            for r in runs:
                writer.writerow([r.name, *(getattr(r.options, k) for k in settings), *(r.metrics.get(n, "") for n in names)])
    print(f"wrote {path}", file=sys.stderr)
