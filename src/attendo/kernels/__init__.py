"""Hand-written CPU kernels, built from C source on first use and cached.

- matmul.c: y = x·Wᵀ with W in float32/float16/bfloat16 or one of ggml's block formats (Q8_0,
  Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q2_K...Q6_K), multiplied as the bytes they are;
  and the dequantization of such rows (an embedding lookup, a reference).
- packed.c: the common block formats rearranged ("packed", same size) so that one vector
  instruction serves 16 output rows; pack() makes that layout, matmul(..., packed=True) uses it.
- formats.c: the activations' rounding and every block format's layout, spelled out once.
- attention.c: softmax(QKᵀ·scale + bias)V over the keys a mask allows.
- decoder.c: every layer of a decoder-only network in one call (see attendo.fused).

Both are batch-invariant: a row's result depends on that row's inputs alone, never on how many
other rows are computed beside it, so a prompt gives bit for bit the same logits alone, in a
batch, prefilled whole or in chunks (torch's matrix multiply and fused attention do not promise
that; see the C files for why).

The library is compiled with the machine's C compiler (``$CC``, else ``cc``) for the machine's own
CPU (``-march=native``: AVX-512 VNNI, AVX-VNNI or AVX2 code, whichever the CPU has), and kept in
the user's cache directory under a name that hashes the sources, the flags and the CPU's feature
flags. Where no compiler works, ``available()`` is False and ``unavailable_reason()`` says why;
callers then fall back to torch's own products (fast and correct, but not batch-invariant).

The products are registered as the torch operators ``attendo::matmul`` and ``attendo::attention``
so that a compiled decode step calls them as opaque operations.
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

_DIRECTORY = Path(__file__).parent
_SOURCES = [_DIRECTORY / name for name in ("formats.c", "matmul.c", "packed.c", "attention.c", "decoder.c")]
_HEADERS = [_DIRECTORY / name for name in ("simd.h", "formats.h", "internal.h")]
# No contraction of a·b + c into one rounding: the dequantized weights equal torch's, bit for bit.
_COMMON_FLAGS = ("-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
NATIVE = ("-march=native",)
# What the AVX2-only machines build (tests build this too, to keep that path checked).
AVX2_ONLY = ("-mavx2", "-mfma", "-mf16c")
PORTABLE = ()  # plain C: the fallback for CPUs without AVX2

# ggml's type numbers of the float formats; the block formats use GGMLQuantizationType's.
F32, F16, BF16 = 0, 1, 30
_FLOAT_FORMATS = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "attendo" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cpu_flags() -> str:
    """The CPU's feature flags as /proc/cpuinfo lists them (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo") as info:
            line = next((line for line in info if line.startswith(("flags", "Features"))), "")
            return line.partition(":")[2].strip() or platform.processor()
    except OSError:
        return platform.machine() + " " + platform.processor()


def _library_path(compiler: str, flags: tuple[str, ...] = NATIVE) -> Path:
    """Where the library built from these sources, with this compiler and flags, for this CPU lives."""
    identity = b"".join(path.read_bytes() for path in [*_SOURCES, *_HEADERS])
    identity += " ".join([compiler, *_COMMON_FLAGS, *flags, cpu_flags()]).encode()
    return _cache_dir() / f"attendo-kernels-{hashlib.sha256(identity).hexdigest()[:16]}.so"


def _build(compiler: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Compile the library to target; the reason when that fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed, so concurrent first uses never load half a file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *_COMMON_FLAGS, *flags, *map(str, _SOURCES), "-o", str(built)]
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except OSError as error:
            return f"cannot run the C compiler {compiler}: {error.strerror}"
        if result.returncode != 0:
            first_error = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr)
            return f"{compiler} could not build the kernels: {first_error.strip() or 'exit code ' + str(result.returncode)}"
        os.replace(built, target)
    return None


@cache
def library(flags: tuple[str, ...] = NATIVE) -> ctypes.CDLL | str:
    """The kernel library built with these instruction-set flags, or the reason there is none."""
    compiler = _compiler()
    if compiler is None:
        return "no C compiler found (set CC, or install gcc)"
    target = _library_path(compiler, flags)
    if not target.exists() and (problem := _build(compiler, flags, target)):
        return problem
    try:
        loaded = ctypes.CDLL(str(target))
    except OSError as error:
        return f"cannot load {target} ({error}); delete it to rebuild"
    c_int, c_ptr, c_float, c_long = ctypes.c_int, ctypes.c_void_p, ctypes.c_float, ctypes.c_long
    signatures = {
        "attendo_supports": (c_int, [c_int, c_int]),
        "attendo_packs": (c_int, [c_int]),
        "attendo_packed_bytes": (c_long, [c_int, c_int, c_int]),
        "attendo_pack": (c_int, [c_int, c_ptr, c_int, c_int, c_ptr, c_int]),
        "attendo_unpack_rows": (c_int, [c_int, c_ptr, c_int, c_ptr, c_int, c_ptr]),
        "attendo_matmul": (c_int, [c_int, c_ptr, c_int, c_int, c_int, c_ptr, c_int, c_ptr, c_int, c_int]),
        "attendo_dequantize": (c_int, [c_int, c_ptr, c_int, c_int, c_ptr, c_int, c_ptr, c_int]),
        "attendo_attention": (c_int, [c_ptr] * 10 + [c_int] * 6 + [c_float, c_ptr, c_int]),
        "attendo_decoder_layers": (c_int, [c_ptr, c_int, c_ptr, c_int, c_ptr, c_ptr, c_ptr, c_ptr, c_ptr, c_int, c_int, c_int]),
    }
    for name, (result, arguments) in signatures.items():
        function = getattr(loaded, name)
        function.restype, function.argtypes = result, arguments
    return loaded


def available() -> bool:
    return not isinstance(library(), str)


def unavailable_reason() -> str | None:
    loaded = library()
    return loaded if isinstance(loaded, str) else None


def _loaded() -> ctypes.CDLL:
    loaded = library()
    if isinstance(loaded, str):
        raise RuntimeError(loaded)
    return loaded


def weight_format(weight: torch.Tensor, qtype: int | None) -> int:
    """The kernel's format number for a weight: a float tensor's dtype, or the ggml type of blocks."""
    if weight.dtype == torch.uint8:
        if qtype is None:
            raise ValueError("block weights need their ggml type")
        return int(qtype)
    return _FLOAT_FORMATS[weight.dtype]


def supports(fmt: int, in_features: int) -> bool:
    """Whether the kernels multiply by rows of in_features values stored in format fmt."""
    return available() and bool(_loaded().attendo_supports(fmt, in_features))


def packs(fmt: int) -> bool:
    """Whether the kernels have a packed layout for format fmt (see pack)."""
    return available() and bool(_loaded().attendo_packs(fmt))


def pack(blocks: torch.Tensor, fmt: int, in_features: int) -> torch.Tensor:
    """Block rows (out, bytes per row) in the file's layout → the packed layout matmul(...,
    packed=True) multiplies by fastest: the same bytes, 16 rows interleaved (1-D, uint8)."""
    blocks = blocks.contiguous()
    library = _loaded()
    packed = torch.empty(library.attendo_packed_bytes(fmt, blocks.shape[0], in_features), dtype=torch.uint8)
    if library.attendo_pack(fmt, blocks.data_ptr(), blocks.shape[0], in_features, packed.data_ptr(), torch.get_num_threads()):
        raise ValueError(f"format {fmt} with rows of {in_features} cannot be packed")
    return packed


def unpack_rows(packed: torch.Tensor, fmt: int, in_features: int, index: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """Rows index of a packed matrix in the file's layout (len(index), row_bytes)."""
    index = index.reshape(-1).to(torch.int64).contiguous()
    rows = torch.empty(index.numel(), row_bytes, dtype=torch.uint8)
    if _loaded().attendo_unpack_rows(fmt, packed.data_ptr(), in_features, index.data_ptr(), index.numel(), rows.data_ptr()):
        raise ValueError(f"format {fmt} is not packed")
    return rows


def matmul(
    x: torch.Tensor, weight: torch.Tensor, fmt: int, out_features: int, packed: bool = False
) -> torch.Tensor:
    """x (rows, in) float32 · Wᵀ → (rows, out_features). weight: float (out, in), ggml blocks
    (out, bytes per row) in format fmt (see weight_format), or (packed) what pack() made of them.
    Needs available().

    Eager callers reach the C function straight through ctypes; a compiled graph calls the
    registered operator (which costs a few microseconds more per call)."""
    if torch.compiler.is_compiling():
        return torch.ops.attendo.matmul(x, weight, fmt, out_features, packed)
    return _matmul(x, weight, fmt, out_features, packed)


def _matmul(x: torch.Tensor, weight: torch.Tensor, fmt: int, out_features: int, packed: bool) -> torch.Tensor:
    x = x.contiguous()
    y = x.new_empty(x.shape[0], out_features)
    status = _loaded().attendo_matmul(
        fmt, weight.data_ptr(), packed, out_features, x.shape[1], x.data_ptr(), x.shape[0], y.data_ptr(), out_features,
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"the kernels cannot multiply by format {fmt} with rows of {x.shape[1]}")
    return y


def dequantize(
    weight: torch.Tensor, fmt: int, in_features: int, index: torch.Tensor | None = None, packed: bool = False, rows: int | None = None
) -> torch.Tensor:
    """Rows index (all rows when None) of W as float32 (len(index), in_features); rows: how many
    W has (needed when packed). Needs available()."""
    count = weight.shape[0] if rows is None else rows
    if index is None:
        index = torch.arange(count)
    index = index.reshape(-1).to(torch.int64).contiguous()
    if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < count:
        raise IndexError(f"row index out of range for a table of {count} rows")
    values = torch.empty(index.numel(), in_features)
    if _loaded().attendo_dequantize(
        fmt, weight.data_ptr(), packed, in_features, index.data_ptr(), index.numel(), values.data_ptr(), torch.get_num_threads()
    ):  # fmt: skip
        raise RuntimeError(f"the kernels cannot dequantize format {fmt} with rows of {in_features}")
    return values


def decoder_layers(
    layers: ctypes.Array, n_layers: int, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
    rotations: ctypes.Structure, keys: ctypes.Array, values: ctypes.Array, max_len: int, cache_dtype: torch.dtype,
) -> int:
    """x (rows, dim) float32 through decoder.c's layers in place (attendo.fused builds the
    arguments and checks them); the cache's keys and values are float32, float16 or bfloat16.
    0, or -1 when memory ran out. Needs available()."""
    return _loaded().attendo_decoder_layers(
        ctypes.addressof(layers), n_layers, x.data_ptr(), x.shape[0], positions.data_ptr(), slots.data_ptr(),
        ctypes.addressof(rotations), ctypes.addressof(keys), ctypes.addressof(values), max_len,
        _FLOAT_FORMATS[cache_dtype], torch.get_num_threads(),
    )  # fmt: skip


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask)·v: q (batch, heads, queries, dim), k and v (batch, kv_heads, keys,
    dim) with heads a multiple of kv_heads; mask broadcastable to (batch, heads, queries, keys),
    bool (True: may attend) or float (added to the scores; -inf hides a key). float32; a query
    that may attend to no key gets zeros. Needs available()."""
    if torch.compiler.is_compiling():
        return torch.ops.attendo.attention(q, k, v, mask, scale)
    return _attention(q, k, v, mask, scale)


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    t = t if t.dtype == torch.float32 else t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> ctypes.Array:
    return (ctypes.c_int64 * t.dim())(*t.stride())


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    batch, heads, queries, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    out = q.new_empty(batch, heads, queries, dim)
    allowed = bias = None
    if mask is not None:
        full = mask.expand(batch, heads, queries, keys)
        if mask.dtype == torch.bool:
            allowed = full if full.stride(-1) in (0, 1) else full.contiguous()
        else:
            bias = full.float()
    status = _loaded().attendo_attention(
        q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v),
        None if allowed is None else allowed.data_ptr(), None if allowed is None else _strides(allowed),
        None if bias is None else bias.data_ptr(), None if bias is None else _strides(bias),
        batch, heads, kv_heads, queries, keys, dim, scale, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("attention: out of memory")
    return out


# Plain operators (not torch.library.custom_op, whose Python wrappers cost 30 µs per call).
_OPERATORS = torch.library.Library("attendo", "DEF")
_OPERATORS.define("matmul(Tensor x, Tensor weight, int fmt, int out_features, bool packed) -> Tensor")
_OPERATORS.impl("matmul", _matmul, "CPU")
_OPERATORS.define("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor")
_OPERATORS.impl("attention", _attention, "CPU")


@torch.library.register_fake("attendo::matmul", lib=_OPERATORS)
def _(x: torch.Tensor, weight: torch.Tensor, fmt: int, out_features: int, packed: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


@torch.library.register_fake("attendo::attention", lib=_OPERATORS)
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape, dtype=torch.float32)
