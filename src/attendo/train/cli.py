"""The training commands: `attendo train` (pretrain from a preset), `attendo finetune` (adapt a
model, fully or with LoRA) and `attendo loss-curve` (draw a run's log). Thin: each parses flags
into TrainSettings and calls train/pretrain.py or train/finetune.py. `python -m attendo` runs the
same commands, so `torchrun --nproc_per_node N -m attendo train ...` trains on N processes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attendo.cli import UsageError

if TYPE_CHECKING:
    from attendo.train.settings import TrainSettings

TRAIN_DEFAULTS = {"steps": 1000, "batch_size": 16, "lr": 1e-3, "weight_decay": 0.1, "eval_every": 100, "save_every": 500}
FINETUNE_DEFAULTS = {"batch_size": 8, "lr": 1e-4, "weight_decay": 0.0, "eval_every": 50, "save_every": 200}


def _assignment(text: str) -> tuple[str, Any]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return name.strip(), json.loads(value)
    except json.JSONDecodeError:
        return name.strip(), value


def add_training_options(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    g = parser.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                   help=f"sequences per optimizer step, over all processes (default {defaults['batch_size']})")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per forward pass and process; fewer than the batch means gradient accumulation")
    g.add_argument("--lr", type=float, default=defaults["lr"], help=f"peak learning rate (default {defaults['lr']})")
    g.add_argument("--min-lr", type=float, default=None, help="learning rate at the end of the cosine decay (default lr/10)")
    g.add_argument("--warmup-steps", type=int, default=None, help="steps of linear warm-up (default 5%% of the steps)")
    g.add_argument("--weight-decay", type=float, default=defaults["weight_decay"],
                   help=f"AdamW weight decay of weight matrices (default {defaults['weight_decay']})")
    g.add_argument("--clip", type=float, default=1.0, help="clip the gradient norm to this (default 1; 0: off)")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and dropout (default 0)")
    g.add_argument("--precision", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="auto: bfloat16 autocast where the CPU or GPU has bfloat16 arithmetic, else float32")
    g.add_argument("--compile", action="store_true", help="compile the training step with torch.compile (slow start)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: torch's choice)")
    g = parser.add_argument_group("evaluation, checkpoints, processes")
    g.add_argument("--eval-every", type=int, default=defaults["eval_every"],
                   help=f"held-out loss every N steps (default {defaults['eval_every']})")
    g.add_argument("--eval-batches", type=int, default=20, help="held-out micro-batches per evaluation and process (default 20)")
    g.add_argument("--save-every", type=int, default=defaults["save_every"],
                   help=f"checkpoint every N steps (default {defaults['save_every']}; also at the end and on Ctrl-C)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep (default 2)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                   help="under torchrun: ddp (a model copy per process) or fsdp (parameters sharded)")


def train_settings(args: argparse.Namespace, steps: int) -> TrainSettings:
    from attendo.train.settings import TrainSettings

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return TrainSettings(
        steps=steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=args.lr,
        min_lr=args.min_lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, clip=args.clip,
        eval_every=args.eval_every, eval_batches=args.eval_batches, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, seed=args.seed, precision=args.precision, compile=args.compile,
        strategy=args.strategy,
    )  # fmt: skip


def _finish(outcome: Any) -> None:
    if outcome.interrupted:
        raise KeyboardInterrupt  # the CLI's exit code for Ctrl-C, after the checkpoint was saved


def cmd_train(args: argparse.Namespace) -> None:
    from attendo.train.pretrain import pretrain

    if args.steps is None or args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    settings = train_settings(args, args.steps)
    outcome = pretrain(
        args.data, Path(args.out), settings, preset_name=args.preset, config_file=Path(args.config) if args.config else None,
        overrides=dict(args.set or []), seq_len=args.seq_len, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
        eval_fraction=args.eval_fraction, resume=args.resume,
    )  # fmt: skip
    _finish(outcome)


def cmd_finetune(args: argparse.Namespace) -> None:
    from attendo.train.finetune import finetune
    from attendo.train.lora import LoraSettings

    lora_flags = [f"--{n.replace('_', '-')}" for n in ("rank", "alpha", "dropout", "target_modules") if getattr(args, n) is not None]
    if lora_flags and not args.lora:
        raise UsageError(f"{lora_flags[0]} sets up LoRA: add --lora")
    lora = None
    if args.lora:
        given = {n: getattr(args, n) for n in ("rank", "alpha", "dropout", "target_modules") if getattr(args, n) is not None}
        lora = LoraSettings(**given)
    settings = train_settings(args, args.steps or 1)
    outcome = finetune(
        Path(args.data), args.model, Path(args.out), settings, epochs=None if args.steps else args.epochs, lora=lora,
        merge=args.merge, max_len=args.max_len, pack=args.pack, chat=args.chat,
        eval_data=Path(args.eval_data) if args.eval_data else None, eval_fraction=args.eval_fraction, resume=args.resume,
    )  # fmt: skip
    _finish(outcome)


def cmd_loss_curve(args: argparse.Namespace) -> None:
    from attendo.train.plot import plot_loss

    print(plot_loss(Path(args.directory), Path(args.output) if args.output else None))


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("train", help="pretrain a model from a preset on your own text files")
    p.add_argument("data", nargs="+", metavar="DATA", help="text files or folders (.txt, .md, .jsonl with a text field)")
    p.add_argument("--out", "-o", required=True, help="output folder: the model (Hugging Face format), log and checkpoints")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--preset", default="llama-mini", help="architecture from attendo.PRESETS (default llama-mini)")
    shape.add_argument("--config", default=None, help="a JSON file of ModelConfig fields instead of a preset")
    p.add_argument("--set", action="append", type=_assignment, metavar="FIELD=VALUE",
                   help="change a config field, e.g. --set n_layers=2 (repeatable)")
    p.add_argument("--steps", type=int, default=TRAIN_DEFAULTS["steps"], help="optimizer steps (default 1000)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence, the model's context (default 256)")
    vocabulary = p.add_mutually_exclusive_group()
    vocabulary.add_argument("--vocab-size", type=int, default=4096, help="train a byte-level BPE tokenizer of this size (default 4096)")
    vocabulary.add_argument("--tokenizer", default=None, metavar="MODEL", help="use this model's tokenizer instead")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="share of the sequences held out (default 0.05)")
    add_training_options(p, TRAIN_DEFAULTS)
    p.set_defaults(run=cmd_train)

    p = commands.add_parser("finetune", help="adapt a model to JSONL examples: all weights, or LoRA adapters")
    p.add_argument("data", metavar="DATA.jsonl", help='one {"prompt", "completion"} or {"messages": [...]} per line')
    p.add_argument("--model", "-m", required=True, help="the model to start from: name, directory or .gguf file")
    p.add_argument("--out", "-o", required=True, help="output folder: the model or adapter, log and checkpoints")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps")
    length.add_argument("--epochs", type=float, default=3.0, help="passes over the examples (default 3)")
    p.add_argument("--max-len", type=int, default=None, help="tokens per example at most (default the context, up to 1024)")
    p.add_argument("--pack", action="store_true", help="pack examples end to end into rows of --max-len instead of padding")
    p.add_argument("--chat", action="store_true", help="render prompt/completion records with the chat template")
    p.add_argument("--eval-data", default=None, help="held-out examples (JSONL, same format) for the eval loss")
    p.add_argument("--eval-fraction", type=float, default=0.0, help="or hold out this share of DATA (default 0)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora", action="store_true", help="train low-rank adapters only; OUT is a PEFT adapter folder")
    g.add_argument("--rank", type=int, default=None, help="adapter rank (default 8)")
    g.add_argument("--alpha", type=float, default=None, help="adapter scale numerator: scale = alpha / rank (default 16)")
    g.add_argument("--dropout", type=float, default=None, help="dropout on the adapters' input (default 0)")
    g.add_argument("--target-modules", default=None, metavar="NAME,...",
                   help="layers to adapt, as the checkpoint names them (e.g. q_proj,v_proj) or all-linear")
    g.add_argument("--merge", action="store_true", help="fold the adapters into the weights: OUT is a whole model")
    add_training_options(p, FINETUNE_DEFAULTS)
    p.set_defaults(run=cmd_finetune)

    p = commands.add_parser("loss-curve", help="draw a training run's loss curve (from its log.jsonl) as a PNG")
    p.add_argument("directory", metavar="DIR", help="the --out folder of attendo train or finetune")
    p.add_argument("--output", default=None, help="the PNG to write (default DIR/loss.png)")
    p.set_defaults(run=cmd_loss_curve)
