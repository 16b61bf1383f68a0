"""What this machine can do at most: memory bandwidth and float32 matmul throughput."""

from __future__ import annotations

import time

import torch


def _best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def memory_bandwidth_gbs(threads: int, megabytes: int = 512, repeats: int = 5) -> float:
    """Copy bandwidth: bytes read plus bytes written per second, in GB/s."""
    torch.set_num_threads(threads)
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    seconds = _best_seconds(lambda: target.copy_(source), repeats)
    return 2 * source.nbytes / seconds / 1e9


def matmul_gflops(threads: int, size: int = 1024, repeats: int = 5) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = _best_seconds(lambda: a @ b, repeats)
    return 2 * size**3 / seconds / 1e9
