"""What a LoRA adapter costs when decoding with the bundled SmolLM2: attendo beside transformers + peft.

    .venv/bin/python benchmarks/bench_lora.py [--tokens 64] [--repeats 3] [--threads 2]

One adapter (rank 8 on q_proj and v_proj, peft's default targets, random non-zero B) is made with
attendo.train.lora and saved in peft's format; then each engine decodes --tokens tokens greedily
after the same 40-token prompt (token ids, so tokenizers do not differ):

- attendo: the GGUF's Q4_1 blocks without and with the adapter (beside the blocks, unmerged),
  and float32 with the adapter merged;
- transformers: LlamaForCausalLM from the same GGUF (dequantized to float32) with the adapter
  through peft, unmerged and merged (merge_and_unload).

The engines take turns within each repeat; the report gives each one's median tokens per second
(prefill included, model loading not) and whether the float32 engines chose the same tokens. JSON
goes to --out (default benchmarks/results/lora.json).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import machine

MODEL = "smollm2-135m-instruct"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lora.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import attendo
    from attendo.bench.workload import prompt_ids
    from attendo.registry import resolve
    from attendo.train.lora import LoraSettings, add_lora, lora_layers, merge_lora, save_adapter

    adapter = Path(tempfile.mkdtemp()) / "adapter"
    maker = attendo.load(MODEL)
    add_lora(maker, LoraSettings(rank=8, alpha=16, target_modules=("q_proj", "v_proj")))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(maker.network):
            for part in layer.parts.values():
                part.B.copy_(torch.randn(part.B.shape, generator=generator) * 0.02)
    save_adapter(maker, adapter)
    ids = prompt_ids(maker.tokenizer.encode, 40)

    merged = attendo.load(MODEL, dtype="float32", adapter=adapter)
    merge_lora(merged)
    engines = {
        "attendo Q4_1": attendo.load(MODEL),
        "attendo Q4_1 + adapter": attendo.load(MODEL, adapter=adapter),
        "attendo float32, adapter merged": merged,
    }
    runs = {name: _attendo_run(model, ids, args.tokens) for name, model in engines.items()}

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = resolve(MODEL)

    def reference():
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32).eval()

    runs["transformers float32 + peft adapter"] = _transformers_run(PeftModel.from_pretrained(reference(), adapter), ids, args.tokens)
    runs["transformers float32, adapter merged"] = _transformers_run(
        PeftModel.from_pretrained(reference(), adapter).merge_and_unload(), ids, args.tokens
    )

    seconds: dict[str, list[float]] = {name: [] for name in runs}
    chosen: dict[str, list[int]] = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            chosen[name] = run()
            seconds[name].append(time.perf_counter() - start)
    report = {
        "model": MODEL, "tokens": args.tokens, "prompt_tokens": len(ids), "threads": args.threads, "machine": machine(),
        "tokens_per_second": {name: round(args.tokens / statistics.median(s), 1) for name, s in seconds.items()},
        "float32_same_tokens": chosen["attendo float32, adapter merged"] == chosen["transformers float32 + peft adapter"]
        == chosen["transformers float32, adapter merged"],
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def _attendo_run(model, ids: list[int], tokens: int):
    def run() -> list[int]:
        result = model.generate(ids, max_new_tokens=tokens, do_sample=False)
        assert len(result.token_ids) == tokens, "stopped early: raise the prompt's length or lower --tokens"
        return result.token_ids

    return run


def _transformers_run(model, ids: list[int], tokens: int):
    def run() -> list[int]:
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
            )
        return out[0, len(ids) :].tolist()

    return run


if __name__ == "__main__":
    main()
