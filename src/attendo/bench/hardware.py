"""What this machine can do at most: memory bandwidth and float32 matmul throughput, and the
vector instructions its CPU has (which decide what attendo.kernels is built with)."""

from __future__ import annotations

import time

import torch

from attendo.kernels import cpu_flags

# The instruction-set flags that change how fast the kernels (and llama.cpp) run.
VECTOR_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_int8")


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


def vector_flags() -> str:
    """The CPU's vector flags among VECTOR_FLAGS, as /proc/cpuinfo spells them."""
    present = set(cpu_flags().split())
    return " ".join(flag for flag in VECTOR_FLAGS if flag in present) or "no AVX2"
