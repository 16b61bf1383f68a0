"""Load benchmark for `attendo serve`: streaming chat completions at concurrency 1, 4 and 16.

Starts the server on 127.0.0.1 (a subprocess, on a free port), sends a bounded number of streaming
requests at each concurrency level (requests_per_slot x concurrency, at least --min-requests, the
level's requests kept in flight by a semaphore), --rounds times over, and reports per level:

- aggregate output tokens/s: completion tokens of the level's rounds / their wall time
- time to first token (p50, p99): request sent -> first content chunk
- inter-token latency (p50): gaps between consecutive content chunks of one stream
- prompt tokens cached: the share of prompt tokens the server did not prefill, reusing the keys and
  values an earlier request left (usage.prompt_tokens_details.cached_tokens; the prompts share the
  chat template and its system prompt, and repeat every 8 requests unless --distinct-prompts)
- CPU seconds the level took in this client process (time.process_time) and in the server process
  (its utime + stime from /proc, where there is one): client and server share the machine's cores

Prints a table and writes JSON to benchmarks/results/server.json. Loopback only; nothing else is
contacted. With --compare COMMIT, the server of that commit (its src/ exported with git archive, as
benchmarks/bench_commits.py does) runs beside the working tree's: the two take turns level by level
in every round, and the table gives both side by side.

    .venv/bin/python benchmarks/bench_server.py [--model smollm2-135m-instruct] [--max-tokens 64] [--rounds 3] [--compare 88c3877]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a bicycle works, part by part.",
    "Describe a walk through a busy market in a city you love.",
    "Write a letter to a friend about learning to cook.",
    "Tell me everything you know about the history of tea.",
    "Write a detailed guide to planting a vegetable garden.",
    "Describe the life cycle of a star, step by step.",
    "Write a story about a robot that learns to paint.",
]
LEVELS = (1, 4, 16)
REQUEST_NUMBERS = itertools.count()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_request(http: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, seed: int) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    arrivals: list[float] = []
    tokens = prompt_tokens = cached_tokens = 0
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
                tokens, prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
                cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    arrivals.append(time.perf_counter())
    return {
        "ttft": arrivals[0] - sent if arrivals else None,
        "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])],
        "tokens": tokens,
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
    }


def server_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far, from /proc (None where there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime in ticks


async def run_level(url: str, model: str, concurrency: int, requests: int, max_tokens: int, distinct: bool = False) -> dict:
    """One level's requests against one server: what summarise() needs, from every request.
    distinct: every prompt begins with a number no other request of the run has, so that a prefix
    cache can reuse only the chat template's start."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=concurrency)) as http:

        async def bounded(i: int) -> dict:
            async with limit:
                prompt = PROMPTS[i % len(PROMPTS)]
                if distinct:
                    prompt = f"Request {next(REQUEST_NUMBERS)}: {prompt}"
                return await one_request(http, url, model, prompt, max_tokens, seed=i)

        started, cpu = time.perf_counter(), time.process_time()
        results = await asyncio.gather(*(bounded(i) for i in range(requests)))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "requests": requests,
        "output_tokens": sum(r["tokens"] for r in results),
        "prompt_tokens": sum(r["prompt_tokens"] for r in results),
        "cached_tokens": sum(r["cached_tokens"] for r in results),
        "wall_s": wall,
        "client_cpu_s": cpu,
        "ttfts": [r["ttft"] for r in results if r["ttft"] is not None],
        "gaps": [g for r in results for g in r["gaps"]],
    }


def summarise(concurrency: int, rounds: list[dict]) -> dict:
    """A level over every round: tokens/s is all its completion tokens / all its wall time."""
    keys = ("requests", "output_tokens", "prompt_tokens", "cached_tokens", "wall_s", "client_cpu_s")
    total = {key: sum(r[key] for r in rounds) for key in keys}
    ttfts = [t for r in rounds for t in r["ttfts"]]
    level = {
        "concurrency": concurrency,
        **total,
        "tokens_per_s": total["output_tokens"] / total["wall_s"],
        "cached_share": total["cached_tokens"] / total["prompt_tokens"] if total["prompt_tokens"] else 0.0,
        "tokens_per_s_by_round": [r["output_tokens"] / r["wall_s"] for r in rounds],
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile([g for r in rounds for g in r["gaps"]], 50),
    }
    if all("server_cpu_s" in r for r in rounds):
        level["server_cpu_s"] = sum(r["server_cpu_s"] for r in rounds)
    return level


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, log: Path, threads: int | None, source: Path | None, options: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "attendo.cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--max-batch", "16", "--max-queue", "64", "--log-level", "warning"]  # fmt: skip
    if threads:
        command += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(source)} if source else None
    return subprocess.Popen(command + options, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become healthy")


def measure(args: argparse.Namespace, out: Path, sources: dict[str, Path | None]) -> dict[str, list[dict]]:
    """Every level against every server (the working tree's: source None; or the code in a source
    directory). All servers are up at once (an idle one waits without using the CPU) and take
    turns level by level, in alternating order from round to round, so a drift in the machine's
    speed falls on both alike."""
    servers: dict[str, tuple[str, subprocess.Popen]] = {}
    try:
        for number, (name, source) in enumerate(sources.items()):
            port = free_port()
            options = []  # this tree's server only: an older one may not know them
            if source is None and args.kv_cache_dtype:
                options += ["--kv-cache-dtype", args.kv_cache_dtype]
            if source is None and args.no_prefix_cache:
                options.append("--no-prefix-cache")
            log = out.with_suffix(f".{number}.log")
            servers[name] = (f"http://127.0.0.1:{port}", start_server(args.model, port, log, args.threads, source, options))
        for url, process in servers.values():
            wait_healthy(url, process)
            asyncio.run(run_level(url, args.model, 1, 1, 8))  # warm-up, not reported
        rounds: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in LEVELS} for name in servers}
        for number in range(args.rounds):
            order = list(servers) if number % 2 == 0 else list(servers)[::-1]
            for concurrency in LEVELS:
                requests = max(args.requests_per_slot * concurrency, args.min_requests)
                for name in order:
                    url, process = servers[name]
                    server_cpu = server_cpu_seconds(process.pid)
                    level = asyncio.run(run_level(url, args.model, concurrency, requests, args.max_tokens, args.distinct_prompts))
                    if server_cpu is not None:
                        level["server_cpu_s"] = server_cpu_seconds(process.pid) - server_cpu
                    rounds[name][concurrency].append(level)
                    tokens_per_s = level["output_tokens"] / level["wall_s"]
                    print(f"round {number + 1}, {name}, concurrency {concurrency}: {tokens_per_s:.1f} tokens/s", file=sys.stderr)
    finally:
        for _, process in servers.values():
            process.terminate()
        for _, process in servers.values():
            process.wait(60)
    return {name: [summarise(c, rounds[name][c]) for c in LEVELS] for name in servers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-slot", type=int, default=2, help="requests per level and round = this x concurrency (at least --min-requests)")
    parser.add_argument("--min-requests", type=int, default=16, help="every level sends at least this many requests per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every level; the servers take turns in each")
    parser.add_argument("--threads", type=int, default=None, help="passed to attendo serve --threads")
    parser.add_argument("--kv-cache-dtype", default=None, help="passed to attendo serve --kv-cache-dtype (this tree's server only)")
    parser.add_argument("--distinct-prompts", action="store_true",
                        help="begin every prompt with a request number, so that no two requests share more than the chat template's start")
    parser.add_argument("--no-prefix-cache", action="store_true", help="passed to attendo serve (this tree's server only)")
    parser.add_argument("--compare", default=None, help="a commit whose server to measure beside this one, taking turns")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "server.json"))
    args = parser.parse_args()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        sources: dict[str, Path | None] = {}
        if args.compare:
            from bench_commits import export_source

            sources[args.compare] = export_source(args.compare, Path(scratch))
        sources["this tree"] = None
        runs = measure(args, out, sources)

    from attendo.bench.hardware import vector_flags

    report = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "threads": args.threads,
        "kv_cache_dtype": args.kv_cache_dtype,
        "prefix_cache": not args.no_prefix_cache,
        "distinct_prompts": args.distinct_prompts,
        "machine": {"cpus": os.cpu_count(), "cpu_flags": vector_flags(), "platform": platform.platform(),
                    "load_average": os.getloadavg()},  # fmt: skip
        "runs": runs,
        "speedup_16_vs_1": runs["this tree"][-1]["tokens_per_s"] / runs["this tree"][0]["tokens_per_s"],
    }
    out.write_text(json.dumps(report, indent=2))

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    print(f"\n{args.model}, {args.max_tokens} max tokens per request, {os.cpu_count()} CPUs ({vector_flags()})")

    def cpu(level: dict, key: str) -> str:
        return f"{level[key]:.1f}" if key in level else "-"

    print("| code | concurrency | requests | output tokens/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) "
          "| prompt tokens cached | wall (s) | client CPU (s) | server CPU (s) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, levels in runs.items():
        for level in levels:
            print(
                f"| {name} | {level['concurrency']} | {level['requests']} | {level['tokens_per_s']:.1f} | {ms(level['ttft_p50_s'])} "
                f"| {ms(level['ttft_p99_s'])} | {ms(level['itl_p50_s'])} | {level['cached_share']:.0%} | {level['wall_s']:.1f} "
                f"| {cpu(level, 'client_cpu_s')} | {cpu(level, 'server_cpu_s')} |"
            )
    print(f"\nthis tree, throughput at 16 / at 1: {report['speedup_16_vs_1']:.2f}x; JSON in {out}")
    if args.compare:
        older = runs[args.compare]
        print(f"{args.compare}, throughput at 16 / at 1: {older[-1]['tokens_per_s'] / older[0]['tokens_per_s']:.2f}x")
        gain = runs["this tree"][-1]["tokens_per_s"] / runs[args.compare][-1]["tokens_per_s"]
        print(f"at concurrency 16, this tree / {args.compare}: {gain:.2f}x")


if __name__ == "__main__":
    main()
