"""Server metrics in the Prometheus text format (version 0.0.4), written out by hand.

Counters only grow (rate() them in Prometheus); the gauges are read when /metrics is asked for.
Updated from the event loop (requests, prompt tokens) and from scheduler threads (steps, first
tokens), so every update takes the lock.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict, deque

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
THROUGHPUT_WINDOW = 10.0  # seconds over which attendo_generation_tokens_per_second is averaged


def _escape(label: str) -> str:
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, status)
        self.prompt_tokens: Counter[str] = Counter()  # model
        self.generated_tokens: Counter[str] = Counter()
        self.steps: Counter[str] = Counter()
        self.step_seconds: Counter[str] = Counter()
        self.ttft_buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(TTFT_BUCKETS))
        self.ttft_sum: Counter[str] = Counter()
        self.ttft_count: Counter[str] = Counter()
        self.recent: dict[str, deque[tuple[float, int]]] = defaultdict(deque)  # (time, tokens) per step

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[route, status] += 1

    def prompt(self, model: str, tokens: int) -> None:
        with self._lock:
            self.prompt_tokens[model] += tokens

    def step(self, model: str, seconds: float, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.steps[model] += 1
            self.step_seconds[model] += seconds
            self.generated_tokens[model] += tokens
            recent = self.recent[model]
            recent.append((now, tokens))
            while recent and recent[0][0] < now - THROUGHPUT_WINDOW:
                recent.popleft()

    def first_token(self, model: str, seconds: float) -> None:
        with self._lock:
            buckets = self.ttft_buckets[model]
            for i, bound in enumerate(TTFT_BUCKETS):
                if seconds <= bound:
                    buckets[i] += 1
            self.ttft_sum[model] += seconds
            self.ttft_count[model] += 1

    def render(self, queues: dict[str, tuple[int, int]]) -> str:
        """The exposition text; queues: model -> (sequences waiting, sequences running)."""
        now = time.monotonic()
        out: list[str] = []

        def family(name: str, kind: str, help: str) -> None:
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")

        with self._lock:
            family("attendo_requests_total", "counter", "HTTP requests answered, by route and status.")
            for (route, status), n in sorted(self.requests.items()):
                out.append(f'attendo_requests_total{{route="{_escape(route)}",status="{status}"}} {n}')
            family("attendo_prompt_tokens_total", "counter", "Prompt tokens accepted for generation.")
            for model, n in sorted(self.prompt_tokens.items()):
                out.append(f'attendo_prompt_tokens_total{{model="{_escape(model)}"}} {n}')
            family("attendo_generation_tokens_total", "counter", "Tokens generated.")
            for model, n in sorted(self.generated_tokens.items()):
                out.append(f'attendo_generation_tokens_total{{model="{_escape(model)}"}} {n}')
            family("attendo_steps_total", "counter", "Batch steps (one forward for all running sequences).")
            for model, n in sorted(self.steps.items()):
                out.append(f'attendo_steps_total{{model="{_escape(model)}"}} {n}')
            family("attendo_step_seconds_total", "counter", "Time spent in batch steps.")
            for model, s in sorted(self.step_seconds.items()):
                out.append(f'attendo_step_seconds_total{{model="{_escape(model)}"}} {s:.6f}')
            family("attendo_generation_tokens_per_second", "gauge",
                   f"Tokens generated per second over the last {THROUGHPUT_WINDOW:g} s.")  # fmt: skip
            for model in sorted(queues):
                recent = sum(n for t, n in self.recent.get(model, ()) if t >= now - THROUGHPUT_WINDOW)
                out.append(f'attendo_generation_tokens_per_second{{model="{_escape(model)}"}} {recent / THROUGHPUT_WINDOW:.3f}')
            family("attendo_time_to_first_token_seconds", "histogram", "From accepting a request to its first token.")
            for model in sorted(self.ttft_count):
                label = f'model="{_escape(model)}"'
                for bound, n in zip(TTFT_BUCKETS, self.ttft_buckets[model]):
                    out.append(f'attendo_time_to_first_token_seconds_bucket{{{label},le="{bound:g}"}} {n}')
                count = self.ttft_count[model]
                out.append(f'attendo_time_to_first_token_seconds_bucket{{{label},le="+Inf"}} {count}')
                out.append(f"attendo_time_to_first_token_seconds_sum{{{label}}} {self.ttft_sum[model]:.6f}")
                out.append(f"attendo_time_to_first_token_seconds_count{{{label}}} {count}")
        family("attendo_queue_depth", "gauge", "Sequences waiting for a cache slot.")
        for model, (waiting, _) in sorted(queues.items()):
            out.append(f'attendo_queue_depth{{model="{_escape(model)}"}} {waiting}')
        family("attendo_running_sequences", "gauge", "Sequences holding a cache slot.")
        for model, (_, running) in sorted(queues.items()):
            out.append(f'attendo_running_sequences{{model="{_escape(model)}"}} {running}')
        return "\n".join(out) + "\n"
