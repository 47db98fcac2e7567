"""A per-sequence KV cache the engine owns: preallocated, trimmed and compacted in place."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of one sequence, `[layers, kv_heads, capacity, head_dim]` each.

    Slots [0, length) hold committed tokens in order. A forward pass appends its rows after
    them; afterwards the engine keeps only what plain decoding would have cached, either by
    trimming (`truncate`) or by moving the accepted tree nodes into consecutive slots (`compact`).
    """

    GROWTH_CHUNK = 256  # slots added at least per growth, so growth is rare

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", max_capacity: int | None = None) -> None:
        shape = (num_layers, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.max_capacity = max(capacity, max_capacity or capacity)
        self.length = 0

    @torch.inference_mode()
    def ensure(self, needed: int) -> None:
        """Make room for `needed` slots, growing geometrically up to `max_capacity`.

        A request that may run to the whole context starts small; copying its cache once in a
        while costs far less than reserving the worst case for every request up front."""
        if needed <= self.capacity:
            return
        if needed > self.max_capacity:
            raise RuntimeError(f"KV cache overflow: need {needed} slots, at most {self.max_capacity}")
        new_capacity = min(self.max_capacity, max(needed, 2 * self.capacity, self.capacity + self.GROWTH_CHUNK))
        layers, heads, _, dim = self.keys.shape
        for name in ("keys", "values"):
            old = getattr(self, name)
            grown = torch.zeros((layers, heads, new_capacity, dim), dtype=old.dtype, device=old.device)
            grown[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, grown)
        self.capacity = new_capacity

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    @torch.inference_mode()
    def compact(self, base: int, kept_slots: list[int]) -> None:
        """Keep slots [0, base) plus `kept_slots` (ascending, all >= base), moved to follow `base`.

        Stale entries beyond the new length are left in place: the next forward overwrites them,
        so nothing is zeroed and no whole cache is ever copied.
        """
        n = len(kept_slots)
        if n and kept_slots != list(range(base, base + n)):
            src = torch.tensor(kept_slots, dtype=torch.long, device=self.keys.device)
            dst = slice(base, base + n)
            # Gather first (index_select copies), so overlapping source and destination are safe.
            self.keys[:, :, dst] = self.keys.index_select(2, src)
            self.values[:, :, dst] = self.values.index_select(2, src)
        self.length = base + n

    @property
    def nbytes(self) -> int:
        return self.keys.nelement() * self.keys.element_size() * 2
