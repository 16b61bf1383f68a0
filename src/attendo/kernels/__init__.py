"""Hand-written CPU kernels, built from C source on first use and cached.

One library so far (block_matmul.c): the matrix product with weights in ggml's block formats,
and their dequantization for products with many rows.
It is compiled with the machine's C compiler (``$CC``, else ``cc``) for the machine's own CPU
(``-march=native``), as torch.compile compiles its kernels, and kept in the user's cache
directory under a name that hashes the source and the flags. Where no compiler works,
``available()`` is False and ``unavailable_reason()`` says why; callers then fall back to
dequantizing the weights for torch's own matrix multiply.

The product is registered as the torch operator ``attendo::block_matmul`` so that a compiled
decode step calls it as one opaque operation.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("block_matmul.c")
# No contraction of a·b + c into one rounding: the dequantized weights equal torch's, bit for bit.
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "attendo" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_signature() -> str:
    """What -march=native compiles for: a library built on one CPU may not run on another that
    shares the cache directory, so the CPU's feature flags are part of the library's name."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.machine() + platform.processor()


def _library_path(compiler: str) -> Path:
    """Where the library built from this source, with this compiler and flags, for this CPU lives."""
    identity = _SOURCE.read_bytes() + " ".join([compiler, *_FLAGS, _cpu_signature()]).encode()
    return _cache_dir() / f"block_matmul-{hashlib.sha256(identity).hexdigest()[:16]}.so"


@cache
def _library() -> ctypes.CDLL | str:
    """The loaded kernel library, or the reason there is none."""
    compiler = _compiler()
    if compiler is None:
        return "no C compiler found (set CC, or install gcc)"
    target = _library_path(compiler)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built beside its final name and renamed, so concurrent first uses never load half a file.
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            command = [compiler, *_FLAGS, str(_SOURCE), "-o", str(built)]
            try:
                result = subprocess.run(command, capture_output=True, text=True)
            except OSError as error:
                return f"cannot run the C compiler {compiler}: {error.strerror}"
            if result.returncode != 0:
                first_error = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr)
                return f"{compiler} could not build {_SOURCE.name}: {first_error.strip() or 'exit code ' + str(result.returncode)}"
            os.replace(built, target)
    try:
        library = ctypes.CDLL(str(target))
    except OSError as error:
        return f"cannot load {target} ({error}); delete it to rebuild"
    library.attendo_block_matmul.restype = ctypes.c_int
    library.attendo_block_matmul.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
    ]  # fmt: skip
    library.attendo_block_dequantize.restype = ctypes.c_int
    library.attendo_block_dequantize.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
    ]  # fmt: skip
    return library


def available() -> bool:
    return not isinstance(_library(), str)


def unavailable_reason() -> str | None:
    library = _library()
    return library if isinstance(library, str) else None


def block_matmul(x: torch.Tensor, blocks: torch.Tensor, qtype: int, out_features: int) -> torch.Tensor:
    """x (rows, in) float32 · Wᵀ → (rows, out_features), W given as ggml blocks of type `qtype`
    (uint8, out_features rows). Needs available().

    Eager callers reach the C function straight through ctypes; a compiled graph calls the
    registered operator (which costs a few microseconds more per call)."""
    if torch.compiler.is_compiling():
        return torch.ops.attendo.block_matmul(x, blocks, qtype, out_features)
    return _block_matmul(x, blocks, qtype, out_features)


def _loaded() -> ctypes.CDLL:
    library = _library()
    if isinstance(library, str):
        raise RuntimeError(library)
    return library


def _block_matmul(x: torch.Tensor, blocks: torch.Tensor, qtype: int, out_features: int) -> torch.Tensor:
    library = _loaded()
    x = x.contiguous()
    y = x.new_empty(x.shape[0], out_features)
    status = library.attendo_block_matmul(
        qtype, blocks.data_ptr(), out_features, x.shape[1], x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads()
    )
    if status != 0:
        raise RuntimeError(f"block_matmul failed for ggml type {qtype} ({x.shape[0]} x {x.shape[1]})")
    return y


def block_dequantize(blocks: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor:
    """The float32 matrix (rows, in_features) that ggml blocks of type `qtype` hold. Needs available()."""
    library = _loaded()
    values = torch.empty(blocks.shape[0], in_features)
    if library.attendo_block_dequantize(qtype, blocks.data_ptr(), blocks.shape[0], in_features, values.data_ptr(), torch.get_num_threads()):
        raise RuntimeError(f"block_dequantize does not know ggml type {qtype}")
    return values


# A plain operator (not torch.library.custom_op, whose Python wrappers cost 30 µs per call).
_OPERATORS = torch.library.Library("attendo", "DEF")
_OPERATORS.define("block_matmul(Tensor x, Tensor blocks, int qtype, int out_features) -> Tensor")
_OPERATORS.impl("block_matmul", _block_matmul, "CPU")


@torch.library.register_fake("attendo::block_matmul", lib=_OPERATORS)
def _(x: torch.Tensor, blocks: torch.Tensor, qtype: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)
