"""The inspection commands of `attendo`: the views of the playground in a terminal and as PNGs.

- `attendo distribution PROMPT`: the next token's distribution after each sampler stage, as a
  table, a PNG (--out) or JSON (--json), with the settings `attendo generate` would use.
- `attendo attention TEXT --out map.png`: one layer's attention as heatmaps.
- `attendo embed-plot WORD_OR_TEXT ... --out space.png`: words or texts placed by PCA, with the
  angles between them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from attendo.cli import (
    EMBEDDING_MODEL,
    UsageError,
    add_model_options,
    add_sampling_options,
    generation_settings,
    load_model,
    read_prompt,
)


def _png(path: str) -> str:
    if not path.lower().endswith(".png"):
        raise UsageError(f"--out must name a .png file, got {path!r}")
    return path


def _saved(path: str, what: str) -> None:
    print(f"saved {what} to {path}", file=sys.stderr)


def _name(args: argparse.Namespace) -> str:
    """The model as the user named it (a path by its last part)."""
    return Path(args.model).name


def _shorten(text: str, length: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= length else flat[: length - 1] + "…"


# --- distribution -----------------------------------------------------------------------------


def cmd_distribution(args: argparse.Namespace) -> None:
    out = _png(args.out) if args.out else None
    model = load_model(args)
    prompt = read_prompt(args)
    # A chat prompt as token ids: text the user typed stays text (see TextTokenizer.encode_chat).
    context = model.encode_chat([{"role": "user", "content": prompt}]) if args.chat else prompt
    report = model.sampling_stages(context, top=args.top, **generation_settings(args, model))
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
        return
    labels = {t.id: t.token for stage in report.stages for t in stage.tokens}
    title = f"{_name(args)}: the next token after {_shorten(prompt)!r}"
    if out:
        from attendo.inspect.plots import save, stages_figure

        save(stages_figure(report, labels, title, args.top), out)
        _saved(out, "the sampling stages")
        return
    _print_stages(report, labels, title, args.top)


def _percent(p: float) -> str:
    return f"{p:.2%}" if p >= 0.001 else f"{p * 100:.2g}%"


def _print_stages(report: Any, labels: dict[int, str], title: str, top: int) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from attendo.inspect.plots import setting_text, stage_rows

    table = Table(title=title, caption="p after each stage; – removed; ▶ the chosen token", box=box.SIMPLE_HEAD)
    table.add_column("token", no_wrap=True, max_width=18, overflow="ellipsis")
    for stage in report.stages:
        table.add_column(f"{stage.name}\n{setting_text(stage.name, report)}".rstrip(), justify="right")
    chosen = report.chosen.id if report.chosen is not None else None
    for token in stage_rows(report, top):
        probabilities = [report.probability(s.name, token) for s in report.stages]
        name = ("▶ " if token == chosen else "  ") + repr(labels[token])
        table.add_row(name, *[_percent(p) if p > 0 else "–" for p in probabilities], style="bold" if token == chosen else None)
    table.add_section()
    table.add_row("kept", *[f"{s.kept:,}" for s in report.stages])
    table.add_row("mass", *[f"{s.mass:.3f}" for s in report.stages])
    table.add_row("entropy, bits", *[f"{s.entropy:.2f}" for s in report.stages])
    table.add_row("cut-off", *["" if s.threshold is None else _percent(s.threshold) for s in report.stages])
    console = Console()
    console.width = max(console.width, 110)  # a pipe reports 80 columns: keep the rows on one line each
    console.print(table)


# --- attention --------------------------------------------------------------------------------


def cmd_attention(args: argparse.Namespace) -> None:
    from attendo.inspect.attention import attention_inputs, layer_attention
    from attendo.inspect.plots import attention_figure, save
    from attendo.inspect.tokens import readable_tokens

    out = _png(args.out)
    model = load_model(args)
    ids, target = attention_inputs(model, text=args.text, target=args.target)
    view = layer_attention(model, ids, target, args.layer)
    if args.head is not None and not 0 <= args.head < view.heads:
        raise UsageError(f"--head must be from 0 to {view.heads - 1} ({_name(args)} has {view.heads} heads), got {args.head}")
    which = "all heads" if args.all_heads else f"head {args.head}" if args.head is not None else f"average of {view.heads} heads"
    title = f"{_name(args)}: layer {view.layer} (of 0-{view.layers - 1}), {which}"
    labels = readable_tokens(model.tokenizer, ids)
    targets = None if target is None else readable_tokens(model.tokenizer, target)
    save(attention_figure(view, labels, targets, title, args.head, args.all_heads), out)
    _saved(out, f"the attention of layer {view.layer}")


# --- embed-plot -------------------------------------------------------------------------------


def cmd_embed_plot(args: argparse.Namespace) -> None:
    from attendo.inspect.geometry import geometry
    from attendo.inspect.plots import geometry_figure, save

    out = _png(args.out)
    model = load_model(args)
    found = geometry(model, args.texts, 3 if args.three_d else 2)
    title = f"{_name(args)}: {len(args.texts)} texts in {'3' if args.three_d else '2'}-D"
    save(geometry_figure(found, args.texts, title, args.three_d), out)
    _saved(out, f"{len(args.texts)} points")


# --- the parsers ------------------------------------------------------------------------------


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("distribution", help="the next token's probabilities after each sampler stage")
    p.add_argument("prompt", nargs="?", help="the prompt (default: read standard input)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user message")
    p.add_argument("--top", type=int, default=20, help="tokens shown (default 20, at most 200)")
    p.add_argument("--out", default=None, help="write a PNG instead of printing a table")
    p.add_argument("--json", action="store_true", help="print the stages as JSON")
    add_model_options(p)
    add_sampling_options(p.add_argument_group("sampling (as for attendo generate)"))
    p.set_defaults(run=cmd_distribution)

    p = commands.add_parser("attention", help="a layer's attention weights as heatmaps (PNG)")
    p.add_argument("text")
    p.add_argument("--target", default=None, help="encoder-decoder models: the decoder's text (cross-attention)")
    p.add_argument("--layer", type=int, default=0, help="the layer (default 0; -1 is the last)")
    heads = p.add_mutually_exclusive_group()
    heads.add_argument("--head", type=int, default=None, help="one head (default: the average of the heads)")
    heads.add_argument("--all-heads", action="store_true", help="every head of the layer")
    p.add_argument("--out", required=True, help="the PNG to write")
    add_model_options(p)
    p.set_defaults(run=cmd_attention)

    p = commands.add_parser("embed-plot", help="words or texts as points (PCA) with the angles between them (PNG)")
    p.add_argument("texts", nargs="+", metavar="WORD_OR_TEXT")
    p.add_argument("--3d", dest="three_d", action="store_true", help="three principal components instead of two")
    p.add_argument("--out", required=True, help="the PNG to write")
    add_model_options(p, EMBEDDING_MODEL)
    p.set_defaults(run=cmd_embed_plot)
