"""The decoder's stack of blocks run as one C call (attendo.kernels' decoder.c), a speed-up pass.

A decoder-only network's forward embeds the tokens, runs its blocks, and applies the final norm
and the LM head. Run from Python, each block is some 80 small torch operations whose dispatch
costs more than the arithmetic of a small model's decode step. ``fuse_blocks(network)`` hands
the stack to C instead: a ``FusedBlocks`` reads every block's weights where the modules keep them
(nothing is copied) into C descriptions once, and the network's ``run_blocks`` then makes one
call per forward. Embedding, final norm and head stay the network's own modules.

The C code computes what the modules compute (the same kernels for products and attention, its
own loops for norms, RoPE and activations), with every row on its own: batch-invariant too, but
not bit-identical to the modules' torch path. So one model uses one path for everything it
generates: prefill, decode, ``logits`` alike. A forward the C code cannot take runs the blocks
as usual: one that records attention weights, needs gradients, is not float32, has no KV cache
and custom positions, a cache in another dtype than float32, float16 or bfloat16, or a block whose modules changed since the plan was made (a LoRA adapter,
say) or are of a kind the C code does not know (``unfusable`` says why).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from attendo import kernels
from attendo.layers.attention import AttentionContext
from attendo.layers.kv_cache import KVCache
from attendo.layers.norm import RMSNorm
from attendo.optimize import BlockLinear, HalfLinear, KernelLinear, StackedLinear

_ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
_MAX_PARTS = 4
_c_ptr, _c_int, _c_float = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


class _Norm(ctypes.Structure):
    _fields_ = [("weight", _c_ptr), ("bias", _c_ptr), ("eps", _c_float), ("offset", _c_float), ("kind", _c_int)]


class _Part(ctypes.Structure):
    _fields_ = [("data", _c_ptr), ("format", _c_int), ("packed", _c_int), ("rows", _c_int)]


class _Matrix(ctypes.Structure):
    _fields_ = [("parts", _Part * _MAX_PARTS), ("n_parts", _c_int), ("in_features", _c_int), ("out", _c_int), ("bias", _c_ptr)]


class _Layer(ctypes.Structure):
    _fields_ = [
        *[(name, _c_int) for name in ("dim", "heads", "kv_heads", "head_dim", "ffn", "gated", "activation", "rope_dims", "window", "rope")],
        ("scale", _c_float),
        *[(name, _Norm) for name in ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm")],
        *[(name, _Matrix) for name in ("qkv", "out", "up", "down")],
        ("alibi", _c_ptr),
    ]  # fmt: skip


class _Rotations(ctypes.Structure):
    _fields_ = [("cos", _c_ptr), ("sin", _c_ptr), ("sliding_cos", _c_ptr), ("sliding_sin", _c_ptr)]


_NO_ROPE, _GLOBAL_ROPE, _SLIDING_ROPE = 0, 1, 2
CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what decoder.c keeps keys and values in


class Unfusable(Exception):
    """A network (or block) the C code cannot run; the message says what."""


def _float32(t: torch.Tensor | None, what: str) -> torch.Tensor | None:
    if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
        raise Unfusable(f"{what} is not a contiguous float32 tensor")
    return t


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _norm(module: nn.Module | None, what: str) -> _Norm:
    if module is None:
        return _Norm()
    if isinstance(module, RMSNorm):
        return _Norm(_pointer(_float32(module.weight, what)), None, module.eps, module.offset, 0)
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        return _Norm(_pointer(_float32(module.weight, what)), _pointer(_float32(module.bias, what)), module.eps, 0.0, 1)
    raise Unfusable(f"{what} is a {type(module).__name__}")


def _parts(module: nn.Module, what: str) -> list[tuple[torch.Tensor, int, bool, int]]:
    """(data, kernel format, packed, rows) of each part of a projection."""
    if isinstance(module, BlockLinear) and module.use_kernel:
        return [(module.blocks, int(module.qtype), module.packed, module.out_features)]
    if isinstance(module, StackedLinear):
        if any(part.bias is not None for part in module.parts):
            raise Unfusable(f"{what} has biases on its parts")
        return [p for part in module.parts for p in _parts(part, what)]
    if isinstance(module, KernelLinear) and module.use_kernel:
        weight = _float32(module.weight, what)
        return [(weight, kernels.F32, False, module.out_features)]
    if isinstance(module, HalfLinear) and module.use_kernel:
        return [(module.weight, kernels.weight_format(module.weight, None), False, module.weight.shape[0])]
    raise Unfusable(f"{what} is a {type(module).__name__} the kernels do not multiply")


def _matrix(module: nn.Module, what: str) -> _Matrix:
    parts = _parts(module, what)
    if len(parts) > _MAX_PARTS:
        raise Unfusable(f"{what} has more than {_MAX_PARTS} parts")
    matrix = _Matrix(n_parts=len(parts), in_features=module.in_features, out=sum(rows for *_, rows in parts))
    matrix.bias = _pointer(_float32(module.bias, what))
    for i, (data, fmt, packed, rows) in enumerate(parts):
        if not kernels.supports(fmt, module.in_features):
            raise Unfusable(f"{what}: format {fmt} with rows of {module.in_features}")
        matrix.parts[i] = _Part(data.data_ptr(), fmt, int(packed), rows)
    return matrix


def _watched(network: nn.Module) -> list[tuple[dict, str, nn.Module | None]]:
    """(parent's _modules, name, module) of every module the plan reads, and of the containers on
    the way to them: if any entry no longer holds its module, the plan is stale. Read straight
    from the dicts: nn.Module's attribute lookup would cost 0.2 ms per check for 30 blocks."""
    watched = [(network._modules, "blocks", network.blocks)]
    for index, block in enumerate(network.blocks):
        watched.append((network.blocks._modules, str(index), block))
        for name in ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm", "attn", "mlp"):
            watched.append((block._modules, name, block._modules.get(name)))
        for parent, names in ((block.attn, ("qkv", "out", "q_norm", "k_norm")), (block.mlp, ("up", "down"))):
            watched += [(parent._modules, name, parent._modules.get(name)) for name in names]
    return watched


class FusedBlocks:
    """Runs a DecoderLM's blocks through attendo.kernels' decoder.c (see the module docstring)."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network
        self.layers = (_Layer * len(network.blocks))(*(self._layer(i, b) for i, b in enumerate(network.blocks)))
        self.watched = _watched(network)
        self._caches: dict[int, tuple[KVCache, ctypes.Array, ctypes.Array]] = {}

    def _layer(self, index: int, block: nn.Module) -> _Layer:
        config, attn, mlp = self.network.config, block.attn, block.mlp
        what = f"blocks.{index}"
        if not config.pre_norm or block.cross is not None:
            raise Unfusable(f"{what} is not a pre-norm self-attention block")
        if config.activation not in _ACTIVATIONS:
            raise Unfusable(f"activation {config.activation!r}")
        layer = _Layer(
            dim=config.dim, heads=attn.n_heads, kv_heads=attn.n_kv_heads, head_dim=attn.head_dim, ffn=config.ffn_dim,
            gated=int(mlp.gated), activation=_ACTIVATIONS[config.activation], scale=attn.scale,
            window=config.sliding_window if attn.sliding else 0,
            attn_norm=_norm(block.attn_norm, f"{what}.attn_norm"), mlp_norm=_norm(block.mlp_norm, f"{what}.mlp_norm"),
            post_attn_norm=_norm(block.attn_post_norm, f"{what}.attn_post_norm"),
            post_mlp_norm=_norm(block.mlp_post_norm, f"{what}.mlp_post_norm"),
            q_norm=_norm(attn.q_norm, f"{what}.attn.q_norm"), k_norm=_norm(attn.k_norm, f"{what}.attn.k_norm"),
            qkv=_matrix(attn.qkv, f"{what}.attn.qkv"), out=_matrix(attn.out, f"{what}.attn.out"),
            up=_matrix(mlp.up, f"{what}.mlp.up"), down=_matrix(mlp.down, f"{what}.mlp.down"),
        )  # fmt: skip
        if config.positions == "rope":
            layer.rope_dims, layer.rope = config.rope_dims, _SLIDING_ROPE if attn.sliding else _GLOBAL_ROPE
        elif config.positions == "alibi":
            layer.alibi = _float32(self.network.alibi_slopes, "alibi_slopes").data_ptr()
        elif config.positions not in ("learned", "sinusoidal"):
            raise Unfusable(f"positions {config.positions!r}")
        return layer

    def usable(self, x: torch.Tensor, ctx: AttentionContext) -> bool:
        """Whether this forward can run in C (else the blocks run as usual)."""
        if ctx.record is not None or x.dtype != torch.float32 or not _enabled:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.network.parameters())):
            return False
        return ctx.cache is None or ctx.cache.keys[0].dtype in CACHE_DTYPES

    def current(self) -> bool:
        """Whether the blocks still hold the modules this plan read."""
        return len(self.network.blocks) == len(self.layers) and all(d.get(n) is m for d, n, m in self.watched)

    def __call__(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        batch, tokens, dim = x.shape
        cache, positions, slots = ctx.cache, ctx.positions, ctx.slots
        if cache is None:  # a plain forward (logits): a cache just for it, rows 0..batch-1
            cache = self.network.new_cache(batch, tokens)
            slots = None
        slot_rows = torch.arange(batch) if slots is None else slots
        keys, values = self._cache_pointers(cache)
        x = x.reshape(batch * tokens, dim).contiguous().clone()
        flat_positions = positions.reshape(-1).to(torch.int64).contiguous()
        flat_slots = slot_rows.to(torch.int64)[:, None].expand(batch, tokens).reshape(-1).contiguous()
        limit = min(cache.max_len, self.network.config.context_length)
        if int(flat_positions.min()) < 0 or int(flat_positions.max()) >= limit or int(flat_slots.max()) >= cache.slots:
            raise IndexError(f"positions must lie in [0, {limit}) and slots in [0, {cache.slots})")
        # Each row's cos and sin, as the attention context computed them for the modules' path.
        rows = [self._rows(pair, batch, tokens) for pair in (ctx.rope, ctx.sliding_rope)]
        rotations = _Rotations(*(_pointer(t) for pair in rows for t in pair))
        status = kernels.decoder_layers(
            self.layers, len(self.layers), x, flat_positions, flat_slots, rotations, keys, values, cache.max_len,
            cache.keys[0].dtype,
        )
        if status != 0:
            raise MemoryError("the fused decoder ran out of memory")
        return x.view(batch, tokens, dim)

    @staticmethod
    def _rows(
        rope: tuple[torch.Tensor, torch.Tensor] | None, batch: int, tokens: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """cos, sin (batch or 1 for a shared table, 1, tokens, rope_dims) as (batch · tokens,
        rope_dims) float32, contiguous."""
        if rope is None:
            return None, None
        return tuple(t.expand(batch, 1, tokens, -1).reshape(batch * tokens, -1).float().contiguous() for t in rope)

    def _cache_pointers(self, cache: KVCache) -> tuple[ctypes.Array, ctypes.Array]:
        """ctypes arrays of the cache's per-layer key and value tensors (made once per cache)."""
        known = self._caches.get(id(cache))
        if known is None or known[0] is not cache or known[1][0] != cache.keys[0].data_ptr():
            pointers = (_c_ptr * len(cache.keys))
            keys = pointers(*(k.data_ptr() for k in cache.keys))
            values = pointers(*(v.data_ptr() for v in cache.values))
            if not all(t.is_contiguous() for t in [*cache.keys, *cache.values]):
                raise Unfusable("the KV cache is not contiguous")
            self._caches = {id(cache): (cache, keys, values)}  # one at a time: the batch's own
            known = self._caches[id(cache)]
        return known[1], known[2]


def unfusable(network: nn.Module) -> str | None:
    """Why the network's blocks cannot run fused, or None when they can."""
    if not kernels.available():
        return kernels.unavailable_reason()
    if getattr(network.config, "family", None) != "decoder" or not hasattr(network, "run_blocks"):
        return "only decoder-only networks run fused"
    try:
        FusedBlocks(network)
    except Unfusable as reason:
        return str(reason)
    return None


def fuse_blocks(network: nn.Module) -> nn.Module:
    """Make the network run its blocks through the C decoder where it can (in place); returns it.
    Call again after replacing its layers (quantizing, say): the plan reads the modules present."""
    if unfusable(network) is None:
        network.run_blocks = _Runner(network, FusedBlocks(network))
    elif "run_blocks" in vars(network):
        del network.run_blocks
    return network


class _Runner:
    """network.run_blocks: the fused blocks where usable, else the network's own loop. When the
    blocks' modules have been replaced since the plan was made (weights quantized after loading,
    an adapter added) the plan is made again, or the blocks run as usual if the C code cannot
    run the new modules."""

    def __init__(self, network: nn.Module, fused: FusedBlocks) -> None:
        self.network, self.fused = network, fused

    def __call__(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.fused is not None and not self.fused.current():
            self.fused = None if unfusable(self.network) else FusedBlocks(self.network)
        usable = self.fused is not None and self.fused.usable(x, ctx)
        if usable and (ctx.cache is not None or _plain_positions(ctx.positions)):
            return self.fused(x, ctx)
        return type(self.network).run_blocks(self.network, x, ctx)


def _plain_positions(positions: torch.Tensor) -> bool:
    """Positions 0, 1, ... in every row: what a cache made just for one forward assumes."""
    return bool((positions == torch.arange(positions.shape[1])).all())


_enabled = True


@contextmanager
def disabled() -> Iterator[None]:
    """Run every network's blocks as the modules do, while open (tests compare the two paths)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved
