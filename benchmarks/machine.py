"""The machine a benchmark ran on, reported beside its numbers (timings mean little without it):
the CPU's name, how many it has, and the vector instruction sets that matter to matrix products,
read from /proc/cpuinfo. The benchmark scripts here import it as a sibling module (`python
benchmarks/NAME.py` puts this folder on sys.path)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

VECTOR_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")


def machine() -> dict[str, object]:
    """{"cpu": name, "cpus": count, "flags": the VECTOR_FLAGS it has, "python", "platform"}."""
    name, flags = platform.processor() or platform.machine() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:  # not Linux: the name platform gives, no flags
        pass
    return {
        "cpu": name, "cpus": os.cpu_count(), "flags": [f for f in VECTOR_FLAGS if f in flags],
        "python": platform.python_version(), "platform": platform.platform(),
    }  # fmt: skip


def describe(found: dict[str, object]) -> str:
    """One line: "NAME, N CPUs, flags avx avx2 ..."."""
    return f"{found['cpu']}, {found['cpus']} CPUs, flags {' '.join(found['flags']) or 'none'}"  # type: ignore[arg-type]
