"""Perplexity of the bundled SmolLM2 on a text: attendo beside transformers, with the same token ids.

    .venv/bin/python benchmarks/eval_perplexity.py [--text data/rag/docs/course-notes.md] [--window 512] [--stride 256]

- attendo, as `attendo eval --perplexity` runs it: the GGUF's Q4_1 blocks as they are (the
  default), then dequantized to float32 (dtype="float32");
- transformers: LlamaForCausalLM from the same GGUF file (gguf_file=..., which dequantizes it to
  float32), scored by the procedure of transformers' perplexity guide: each window's context
  tokens labelled -100, the model's own mean loss weighted by the tokens it scored.

All three read the ids attendo's tokenizer makes of the text (the report says whether
transformers' tokenizer makes the same ones), run on --threads threads one after the other, and
are timed from ids to perplexity. JSON goes to --out (default benchmarks/results/perplexity.json).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from machine import machine

MODEL = "smollm2-135m-instruct"


def transformers_perplexity(model, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """(perplexity, tokens scored) by transformers' perplexity guide, for ids (tokens,)."""
    total, scored, reached = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        chunk = ids[begin:end][None]
        labels = chunk.clone()
        labels[:, : max(reached, begin) - begin] = -100  # context: scored by an earlier window
        counted = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one itself
        with torch.no_grad():
            total += float(model(chunk, labels=labels).loss) * counted
        scored += counted
        reached = end
        if end == len(ids):
            break
    return math.exp(total / scored), scored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", default="data/rag/docs/course-notes.md")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "perplexity.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import attendo
    from attendo.registry import resolve
    from attendo.train.perplexity import perplexity, read_text

    text = read_text(args.text)
    report: dict = {"text": args.text, "window": args.window, "stride": args.stride, "threads": args.threads,
                    "machine": machine(), "engines": {}}  # fmt: skip
    ids = None
    for name, dtype in (("attendo (Q4_1 blocks)", None), ("attendo (float32)", "float32")):
        model = attendo.load(MODEL, dtype=dtype)
        ids = torch.tensor(model.tokenizer.encode(text))
        start = time.perf_counter()
        result = perplexity(model, text, args.window, args.stride)
        report["engines"][name] = {"perplexity": result.perplexity, "tokens": result.tokens,
                                   "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
        del model

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(MODEL)
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32).eval()
    their_ids = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)(text)["input_ids"]
    report["same_token_ids"] = their_ids == ids.tolist()
    start = time.perf_counter()
    value, scored = transformers_perplexity(reference, ids, args.window, args.stride)
    report["engines"]["transformers (GGUF dequantized, float32)"] = {
        "perplexity": value, "tokens": scored, "seconds": round(time.perf_counter() - start, 2)
    }  # fmt: skip
    for engine in report["engines"].values():
        engine["relative_to_transformers"] = engine["perplexity"] / value - 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
