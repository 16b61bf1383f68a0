"""`attendo prompt`: render a prompt template with variables and few-shot examples, show it with
its token count against the context window, and generate from it (see templates.py)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from attendo.cli import (
    UsageError,
    add_generation_options,
    add_model_options,
    check_complete,
    generation_settings,
    load_model,
    write_stream,
)


def parse_variables(pairs: list[str]) -> dict[str, str]:
    variables = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name.isidentifier():
            raise UsageError(f"--var takes NAME=VALUE with NAME a plain identifier, got {pair!r}")
        variables[name] = value
    return variables


def show_prompt(prompt: Any, file: Any = None) -> None:
    """The prompt exactly as the model reads it, between two rules that give its size (on
    standard error unless a file is given: looked up when called, not when this module loads)."""
    from rich.console import Console
    from rich.text import Text

    console = Console(file=file or sys.stderr, highlight=False)
    shots = f", {prompt.shots} example{'s' * (prompt.shots != 1)}" if prompt.shots else ""
    console.rule(f"prompt: {prompt.token_count} of {prompt.window} tokens{shots}", style="dim")
    console.print(Text(prompt.text), soft_wrap=True)  # as is: no markup, no highlighting, no wrapping
    console.rule(style="dim")


def cmd_prompt(args: argparse.Namespace) -> None:
    from attendo.prompting.templates import PromptTemplate, choose_examples, read_examples, render_prompt

    variables = parse_variables(args.var or [])
    template = PromptTemplate.from_file(args.template)
    examples = []
    if args.examples:
        pool = read_examples(args.examples)
        examples = choose_examples(pool, len(pool) if args.shots is None else args.shots, args.shots_seed)
    elif args.shots:
        raise UsageError("--shots needs --examples FILE.jsonl")
    model = load_model(args)
    prompt = render_prompt(model, template, variables, examples, args.input, False if args.completion else None, args.max_new_tokens)
    if args.dry_run:
        show_prompt(prompt, sys.stdout)
        return
    if args.show_prompt:
        show_prompt(prompt)
    stream_completion(model, prompt, max_new_tokens=args.max_new_tokens, stop=args.stop, **generation_settings(args, model))


def stream_completion(model: Any, prompt: Any, **generation: Any) -> None:
    """Print the model's completion of a rendered prompt as it is generated (structured output
    that the token limit cut off is an error, as for attendo generate)."""
    from attendo.prompting.templates import with_prompt_stops

    result = write_stream(model.stream(prompt.token_ids, **with_prompt_stops(prompt, generation)), sys.stdout)
    sys.stdout.write("\n")
    check_complete(result, generation)


def register(commands: Any) -> None:
    p = commands.add_parser("prompt", help="render a prompt template (with few-shot examples) and generate from it")
    p.add_argument("template", metavar="TEMPLATE_FILE", help="a Jinja template (variables, `examples`, `input`)")
    p.add_argument("--examples", metavar="FILE.jsonl", default=None, help='few-shot examples, one {"input": ..., "output": ...} per line')
    p.add_argument("--shots", type=int, default=None, help="how many examples (default: all): the first K in the file")
    p.add_argument("--shots-seed", type=int, default=None, help="take the K examples at random with this seed instead")
    p.add_argument("--var", action="append", metavar="NAME=VALUE", help="a template variable (repeatable)")
    p.add_argument("--input", default=None, help="the question: the template's `input`, or the last turn after the examples")
    p.add_argument("--show-prompt", action="store_true", help="print the rendered prompt and its token count (stderr) before generating")
    p.add_argument("--dry-run", action="store_true", help="print the rendered prompt and its token count, and do not generate")
    p.add_argument("--completion", action="store_true", help="lay the prompt out as plain text even for a chat model")
    add_model_options(p)
    add_generation_options(p)
    p.set_defaults(run=cmd_prompt)
