"""Fine-tune the bundled SmolLM2-135M-Instruct on a small task and measure it before and after.

The task has one fixed answer format: write a date given in words ("the 5th of March, 2021",
"Mar 5 2021", ...) as YYYY-MM-DD. The examples are generated here (seeded): a few hundred for
training and a separate set of dates for evaluation. The script runs the same commands a user
would (through attendo.cli.main): `attendo eval` on the base model, `attendo finetune`, and
`attendo eval` again with the result, then prints the exact-match scores and sample answers.

    .venv/bin/python benchmarks/finetune_smollm2.py --out /tmp/dates [--full] [--train 320] [--epochs 2]
"""

from __future__ import annotations

import argparse
import calendar
import json
import random
import sys
import time
from datetime import date, timedelta
from pathlib import Path

from attendo.cli import main as attendo

QUESTION = "Write this date as YYYY-MM-DD: {}"
ORDINALS = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd", 31: "st"}


def spell(day: date, style: int) -> str:
    month, short = calendar.month_name[day.month], calendar.month_abbr[day.month]
    nth = f"{day.day}{ORDINALS.get(day.day, 'th')}"
    return [
        f"{month} {day.day}, {day.year}",
        f"{day.day} {month} {day.year}",
        f"the {nth} of {month}, {day.year}",
        f"{short} {day.day} {day.year}",
        f"{month} {nth}, {day.year}",
    ][style]


def make_examples(count: int, rng: random.Random, taken: set[date]) -> list[dict[str, str]]:
    examples = []
    while len(examples) < count:
        day = date(1950, 1, 1) + timedelta(days=rng.randrange(100 * 365))
        if day in taken:
            continue
        taken.add(day)
        examples.append({"prompt": QUESTION.format(spell(day, rng.randrange(5))), "completion": day.isoformat()})
    return examples


def write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def evaluate(data: Path, adapter: str | None, out: Path, model: str) -> dict:
    flags = ["--adapter", adapter] if adapter else []
    attendo([
        "eval", "--model", model, *flags, "--dtype", "float32", "--data", str(data), "--chat", "--greedy",
        "--max-new-tokens", "24", "--out", str(out),
    ])  # fmt: skip
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--train", type=int, default=320, help="training examples")
    parser.add_argument("--eval", type=int, default=60, help="evaluation examples (other dates)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--lr", type=float, default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng, taken = random.Random(0), set()
    train = write_jsonl(args.out / "train.jsonl", make_examples(args.train, rng, taken))
    held = make_examples(args.eval, rng, taken)
    evaluation = write_jsonl(args.out / "eval.jsonl", [{"prompt": r["prompt"], "reference": r["completion"]} for r in held])

    before = evaluate(evaluation, None, args.out / "before.json", args.model)
    tuned = args.out / ("full" if args.full else "lora")
    method = [] if args.full else ["--lora", "--rank", "16", "--alpha", "32", "--target-modules", "all-linear"]
    lr = args.lr or (5e-5 if args.full else 1e-3)
    started = time.perf_counter()
    code = attendo([
        "finetune", str(train), "--model", args.model, "--out", str(tuned), "--chat", "--epochs", str(args.epochs),
        "--batch-size", "8", "--lr", str(lr), *method,
    ])  # fmt: skip
    if code:
        sys.exit(code)
    minutes = (time.perf_counter() - started) / 60
    after = evaluate(evaluation, None if args.full else str(tuned), args.out / "after.json", str(tuned) if args.full else args.model)

    print(f"fine-tuning took {minutes:.1f} minutes")
    for name, result in (("before", before), ("after", after)):
        run = result["runs"][0]
        print(name, json.dumps(run["metrics"]))
        for answer in run["answers"][:4]:
            print(f"  {answer['prompt']!r} -> {answer['answer']!r} (reference {answer['reference']})")


if __name__ == "__main__":
    main()
