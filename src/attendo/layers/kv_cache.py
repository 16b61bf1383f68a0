"""A static key/value cache with explicit positions."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, preallocated as (slots, kv_heads, max_len, head_dim).

    Contract: a token's key and value are written into its sequence's slot at the token's explicit
    position; attention then reads positions [0, kv_len) of the slots in use. Positions a slot has
    not written yet hold stale values: the caller's mask must hide them, which the causal mask does
    because a query at position p only sees keys at positions <= p, all written by then. This is
    what lets sequences of different lengths share one batch and one cache without left padding.

    The cache may keep another dtype than the activations' (a float16 cache for float32
    activations, say): a key or value is rounded once when written, and read back in the
    activations' dtype.

    A cache with ``fixed_shapes`` is read whole (kv_len = max_len) at every step: slightly more
    attention work, but every decode step has the same shapes, so torch.compile compiles it once.
    """

    def __init__(
        self,
        n_layers: int,
        slots: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        fixed_shapes: bool = False,
    ) -> None:
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.fixed_shapes = fixed_shapes

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    def update(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor | None,
        kv_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values (batch, kv_heads, tokens, head_dim) at positions (batch, tokens) of
        the given slots (batch,) – None means slots 0..batch-1 – and return the keys and values of
        those slots over positions [0, kv_len), in the dtype of the keys given."""
        batch = keys.shape[0]
        rows = torch.arange(batch, device=keys.device) if slots is None else slots
        # Advanced indices on dims 0 and 2 move to the front: the target is (batch, tokens, heads, dim).
        self.keys[layer][rows[:, None], :, positions] = keys.transpose(1, 2).to(self.keys[layer].dtype)
        self.values[layer][rows[:, None], :, positions] = values.transpose(1, 2).to(self.values[layer].dtype)
        if slots is None:
            cached = self.keys[layer][:batch, :, :kv_len], self.values[layer][:batch, :, :kv_len]
        else:
            cached = self.keys[layer][slots, :, :kv_len], self.values[layer][slots, :, :kv_len]
        return cached[0].to(keys.dtype), cached[1].to(keys.dtype)

    def reorder(self, rows: torch.Tensor) -> None:
        """Slot i takes the contents of slot rows[i] (beam search: each beam continues the one it
        was chosen from)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
