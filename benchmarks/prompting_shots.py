"""Zero-, one- and few-shot prompting side by side on a small labelled task.

    .venv/bin/python benchmarks/prompting_shots.py [--model smollm2-135m-instruct] [--shots 0,1,2,4,8]

The task ships in data/prompting/: 40 short movie reviews to label positive or negative
(sentiment-test.jsonl), a pool of 8 labelled examples for the shots (sentiment-examples.jsonl,
positive and negative alternating; K shots are the first K) and the instruction
(sentiment.jinja). For each number of shots and each layout (chat turns through the model's chat
template, and plain "Input:/Output:" text), every review is answered greedily (at most 4 new
tokens) through attendo.prompting's render/complete API, the same path as `attendo prompt`. An
answer is correct when its first word, lowercased and without punctuation, is the label; it is
well-formed when that word is one of the labels at all. JSON (with how often each answer was
given) goes to --out.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data" / "prompting"


def first_word(text: str) -> str:
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--template", default=str(DATA / "sentiment.jinja"))
    parser.add_argument("--examples", default=str(DATA / "sentiment-examples.jsonl"))
    parser.add_argument("--test", default=str(DATA / "sentiment-test.jsonl"))
    parser.add_argument("--shots", default="0,1,2,4,8")
    parser.add_argument("--out", default="benchmarks/results/prompting_shots.json")
    args = parser.parse_args()

    import attendo
    from attendo.prompting.templates import PromptTemplate, choose_examples, complete, render_prompt, read_examples

    model = attendo.load(args.model)
    template = PromptTemplate.from_file(args.template)
    pool = read_examples(args.examples)
    items = read_examples(args.test)
    labels = {item.output for item in items}
    rows = []
    started = time.perf_counter()
    for shots in [int(s) for s in args.shots.split(",")]:
        row = {"shots": shots}
        for layout, chat in (("chat", True), ("text", False)):
            correct = well_formed = tokens = 0
            answers: dict[str, int] = {}
            for item in items:
                prompt = render_prompt(model, template, {}, choose_examples(pool, shots), item.input, chat, 4)
                answer = first_word(complete(model, prompt, max_new_tokens=4, do_sample=False).text)
                correct += answer == item.output
                well_formed += answer in labels
                answers[answer] = answers.get(answer, 0) + 1
                tokens += prompt.token_count
            row[layout] = {"accuracy": correct / len(items), "well_formed": well_formed / len(items),
                           "prompt_tokens": tokens / len(items), "answers": answers}  # fmt: skip
        rows.append(row)
        print(json.dumps(row))
    report = {"model": args.model, "items": len(items), "seconds": time.perf_counter() - started, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print("| shots | chat turns: accuracy | well-formed | text: accuracy | well-formed | prompt tokens (chat / text) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        c, t = r["chat"], r["text"]
        print(f"| {r['shots']} | {c['accuracy']:.0%} | {c['well_formed']:.0%} | {t['accuracy']:.0%} | "
              f"{t['well_formed']:.0%} | {c['prompt_tokens']:.0f} / {t['prompt_tokens']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
