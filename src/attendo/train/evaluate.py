"""Evaluation on prompts and references: generate an answer to every prompt and score it.

Input: a JSONL file, one example per line, either {"prompt": ..., "reference": ...} (also
{"prompt", "completion"} as attendo finetune reads, and {"input", "output"} as few-shot examples
are written), or {"messages": [...]}, whose last message is the reference answer and whose
earlier messages, rendered with the model's chat template, are the prompt. The file is read and checked whole
before any model runs; a bad line is an error naming the file and the line.

Output: the answers and their scores, as means over the examples, each from 0 to 1:
- rouge1, rouge2, rougeL: ROUGE F-measure (the rouge-score package, with its Porter stemmer:
  its tokenizer keeps lower-cased ASCII letters and digits only);
- exact_match: the answer equals the reference, ignoring surrounding whitespace;
- regex_match (when a pattern is given): re.search finds the pattern in the answer;
- json_valid (when asked): the answer, trimmed, parses as JSON.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attendo.datafiles import read_jsonl
from attendo.errors import DataError
from attendo.model import Model

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# Each example's prompt and reference answer, under any of these keys: attendo finetune's
# {"prompt", "completion"} and the few-shot examples' {"input", "output"} are eval data as they are.
PROMPT_KEYS = ("prompt", "input")
REFERENCE_KEYS = ("reference", "completion", "output")


@dataclass(frozen=True)
class Example:
    reference: str
    line: int
    prompt: str | None = None
    messages: tuple[dict[str, Any], ...] = ()

    def prompt_for(self, model: Model, chat: bool = False) -> str | list[int]:
        """What the model completes: the conversation before the answer as the token ids of the
        model's chat template (text inside messages always encoded as text), or the prompt (as a
        user message in the chat template when chat is set)."""
        if self.messages:
            return model.encode_chat(list(self.messages))
        assert self.prompt is not None
        return model.encode_chat([{"role": "user", "content": self.prompt}]) if chat else self.prompt


@dataclass(frozen=True)
class Checks:
    """Optional checks of every answer: a regular expression to find, JSON validity."""

    regex: re.Pattern[str] | None = None
    json_valid: bool = False


@dataclass
class Answers:
    """What one model answered, with the time it took and the tokens it generated."""

    texts: list[str]
    tokens: int
    seconds: float
    scores: dict[str, float] = field(default_factory=dict)


def read_examples(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    examples = [_example(record, path, number) for number, record in read_jsonl(path)]
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def _example(record: dict[str, Any], path: Path, number: int) -> Example:
    where = f"{path}:{number}"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or len(messages) < 2 or not all(_is_message(m) for m in messages):
            raise DataError(f'{where}: "messages" must be a list of at least two {{"role": ..., "content": "..."}} objects')
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message is the reference answer, so its role must be assistant")
        return Example(messages[-1]["content"], number, messages=tuple(messages[:-1]))
    prompt = next((record[k] for k in PROMPT_KEYS if k in record), None)
    reference = next((record[k] for k in REFERENCE_KEYS if k in record), None)
    if not isinstance(prompt, str) or not isinstance(reference, str):
        raise DataError(f'{where}: needs a "prompt" and a "reference" string (or "input" and "output"), or "messages"')
    return Example(reference, number, prompt=prompt)


def _is_message(message: Any) -> bool:
    return isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)


def answer(
    model: Model,
    prompts: Sequence[str | list[int]],
    batch_size: int,
    generate: dict[str, Any],
    progress: Callable[[int], None] | None = None,
) -> Answers:
    """Generate for every prompt, batch_size prompts at a time; generate holds Model.generate's
    keyword arguments. progress(n) is told of every n prompts done."""
    started = time.perf_counter()
    texts: list[str] = []
    tokens = 0
    for start in range(0, len(prompts), batch_size):
        results = model.generate(list(prompts[start : start + batch_size]), **generate)
        texts += [r.text for r in results]
        tokens += sum(len(r.token_ids) for r in results)
        if progress is not None:
            progress(len(results))
    return Answers(texts, tokens, time.perf_counter() - started)


def score(answers: Sequence[str], references: Sequence[str], checks: Checks = Checks()) -> dict[str, float]:
    """Mean scores over the examples (see the module docstring), by metric name."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for text, reference in zip(answers, references, strict=True):
        for name, value in scorer.score(reference, text).items():
            totals[name] += value.fmeasure
    count = len(references)
    scores = {name: total / count for name, total in totals.items()}
    scores["exact_match"] = sum(a.strip() == r.strip() for a, r in zip(answers, references)) / count
    if checks.regex is not None:
        scores["regex_match"] = sum(checks.regex.search(a) is not None for a in answers) / count
    if checks.json_valid:
        scores["json_valid"] = sum(_parses(a) for a in answers) / count
    return scores


def _parses(text: str) -> bool:
    try:
        json.loads(text.strip())
    except json.JSONDecodeError:
        return False
    return True
