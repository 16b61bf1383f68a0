"""One measurement of one engine, in its own process: `python -m attendo.bench.worker ENGINE JSON`.

Prints one JSON line: load_s, prefill_tps, decode_tps, batch_tps, peak_rss_mb (None where an
engine cannot do a measurement).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from functools import partial
from typing import Any

from attendo.bench.workload import Workload, prompt_ids


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    """Resident memory now (the runtime's, when called after the imports and before loading)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _figures(
    work: Workload,
    load_s: float,
    prefill_s: float,
    decode_s: float,
    batch_s: float | None,
    runtime_mb: float,
    perplexity: float | None,
) -> dict[str, Any]:
    """Seconds measured → the reported rates (decode excludes the first token, which prefill made)."""
    return {
        "load_s": load_s,
        "prefill_tps": work.prompt_tokens / prefill_s,
        "decode_tps": (work.new_tokens - 1) / decode_s,
        "batch_tps": None if batch_s is None else work.batch * (work.new_tokens - 1) / batch_s,
        "peak_rss_mb": _peak_rss_mb(),
        "runtime_rss_mb": runtime_mb,
        "perplexity": perplexity,
    }


def _perplexity(logits: Any, ids: list[int]) -> float:
    """exp(mean cross-entropy) of each next token of ids under logits (len(ids), vocab)."""
    import torch

    return float(torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])).exp())


def run_attendo(path: str, work: Workload, options: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(work.threads)
    start = time.perf_counter()
    import attendo
    from attendo.generation.loop import Batch, Request
    from attendo.optimize import QUANTIZED_FORMATS
    from attendo.generation.sampler import SamplingSettings
    from attendo.inspect.summary import parameter_count

    runtime_mb = _rss_mb()
    # fast_weights: None for the eager engines; "" keeps the loaded format and compiles.
    weights = options.get("fast_weights")
    model = attendo.load(path, dtype=weights if weights in QUANTIZED_FORMATS else options.get("dtype"))
    load_s = time.perf_counter() - start
    if weights is not None:
        model.speed_up(weights or "int8")
    greedy = SamplingSettings()
    encode = lambda text: model.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731

    def generate(prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        """Seconds to the first token of every row, then seconds for the remaining tokens."""
        # No stop ids: every engine generates exactly the same number of tokens.
        batch = Batch(
            model.network, model.tokenizer, [], slots=len(prompts), max_len=len(prompts[0]) + new_tokens,
            decode_step=model.decode_step,
        )
        for ids in prompts:
            batch.add(Request(ids, greedy, new_tokens))
        t0 = time.perf_counter()
        while batch.prefilling or batch.waiting or not batch.decoding:
            batch.step()
        t1 = time.perf_counter()
        while batch.busy:
            batch.step()
        return t1 - t0, time.perf_counter() - t1

    # Each measured run follows an identical warm-up run (which compiles, when compiling).
    single = [prompt_ids(encode, work.prompt_tokens)]
    rows = [prompt_ids(encode, work.batch_prompt_tokens, v) for v in range(work.batch)]
    generate(single, work.new_tokens)
    prefill_s, decode_s = generate(single, work.new_tokens)
    generate(rows, work.new_tokens)
    _, batch_s = generate(rows, work.new_tokens)
    perplexity = _perplexity(model.logits([single[0]])[0], single[0])
    return _figures(work, load_s, prefill_s, decode_s, batch_s, runtime_mb, perplexity) | {
        "weight_bytes_per_token": weight_bytes_per_token(model.network),
        "parameters": parameter_count(model),
    }


def weight_bytes_per_token(network: Any) -> int:
    """Bytes of weights one decode step must read: every tensor but the input embedding table,
    of which a step reads one row (unless it is tied to the LM head, which reads all of it)."""
    tensors = {id(t): t for t in [*network.parameters(), *network.buffers()] if t.dim() >= 1}
    total = sum(t.nbytes for t in tensors.values())
    embed = getattr(network, "embed", None)
    head = getattr(network, "lm_head", None)
    head_tensors = {id(t) for t in [*head.parameters(), *head.buffers()]} if head is not None else set()
    if embed is not None:
        total -= sum(t.nbytes for t in [*embed.parameters(), *embed.buffers()] if id(t) not in head_tensors)
    return total


def run_transformers(path: str, work: Workload, options: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(work.threads)
    start = time.perf_counter()
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    runtime_mb = _rss_mb()
    file = Path(path)
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    load_s = time.perf_counter() - start
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731

    def generate(rows: list[list[int]], new_tokens: int) -> float:
        ids = torch.tensor(rows)
        with torch.inference_mode():
            start = time.perf_counter()
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=0,
            )
            return time.perf_counter() - start

    generate([prompt_ids(encode, 16)], 4)
    prompt = prompt_ids(encode, work.prompt_tokens)
    prefill_s = generate([prompt], 1)
    decode_s = generate([prompt], work.new_tokens) - prefill_s
    rows = [prompt_ids(encode, work.batch_prompt_tokens, v) for v in range(work.batch)]
    batch_s = generate(rows, work.new_tokens) - generate(rows, 1)
    with torch.inference_mode():
        perplexity = _perplexity(model(torch.tensor([prompt])).logits[0], prompt)
    return _figures(work, load_s, prefill_s, decode_s, batch_s, runtime_mb, perplexity)


def run_llama_cpp(path: str, work: Workload, options: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    from llama_cpp import Llama

    runtime_mb = _rss_mb()
    llm = Llama(
        model_path=path, n_ctx=work.prompt_tokens + work.new_tokens + 16, n_threads=work.threads,
        n_threads_batch=work.threads, n_batch=work.prompt_tokens, verbose=False,
    )
    load_s = time.perf_counter() - start
    encode = lambda text: llm.tokenize(text.encode(), add_bos=False, special=False)  # noqa: E731
    llm.eval(prompt_ids(encode, 16))
    llm.reset()
    prompt = prompt_ids(encode, work.prompt_tokens)
    t0 = time.perf_counter()
    llm.eval(prompt)
    token = llm.sample(top_k=1)
    t1 = time.perf_counter()
    for _ in range(work.new_tokens - 1):
        llm.eval([token])
        token = llm.sample(top_k=1)
    t2 = time.perf_counter()
    # The Python binding decodes one sequence at a time; its logits of every position need a
    # differently configured context, so no perplexity.
    return _figures(work, load_s, t1 - t0, t2 - t1, None, runtime_mb, None)


def run_attendo_float32(path: str, work: Workload, options: dict[str, Any]) -> dict[str, Any]:
    """The exact path: a GGUF file dequantized to float32, run eagerly."""
    return run_attendo(path, work, {**options, "dtype": "float32"})


def run_attendo_fast(path: str, work: Workload, options: dict[str, Any], weights: str = "") -> dict[str, Any]:
    return run_attendo(path, work, {**options, "fast_weights": weights})


ENGINES = {
    "attendo": run_attendo,
    "attendo float32": run_attendo_float32,
    "attendo --fast": run_attendo_fast,
    "attendo --fast int8": partial(run_attendo_fast, weights="int8"),
    "attendo --fast int4": partial(run_attendo_fast, weights="int4"),
    "attendo --fast float16": partial(run_attendo_fast, weights="float16"),
    "attendo --fast bfloat16": partial(run_attendo_fast, weights="bfloat16"),
    "transformers": run_transformers,
    "llama.cpp": run_llama_cpp,
}


if __name__ == "__main__":
    engine, spec = sys.argv[1], json.loads(sys.argv[2])
    work = Workload(**spec["workload"])
    print(json.dumps(ENGINES[engine](spec["path"], work, spec.get("options", {}))))
