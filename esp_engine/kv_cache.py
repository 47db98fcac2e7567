"""The KV cache the engine owns: one preallocated pool, handed out to sequences in blocks.

`KVPool` holds keys and values for every sequence, `[layers, kv_heads, slots, head_dim]`,
sized once from a memory budget. `BlockAllocator` divides its slots into fixed-size blocks and
gives each sequence one run of consecutive blocks, so a sequence's cache is a plain strided
view of the pool: attention reads it directly, with no per-step gather of scattered pages
(a gather copies the whole context's keys and values every step: 24 MB per sequence per step for
SmolLM2 at 512 tokens). A run grows in place when the blocks after it are free and moves, once,
when they are not; when the pool has no run left the scheduler makes requests wait or preempts.
"""

from __future__ import annotations

import math

import torch


class KVCacheFull(RuntimeError):
    """The pool has no run of free blocks large enough."""


class BlockAllocator:
    """Runs of consecutive blocks out of `num_blocks`, first fit, neighbours merged on free."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("a block allocator needs at least one block")
        self.num_blocks = num_blocks
        self._free: list[list[int]] = [[0, num_blocks]]  # [start, length], sorted by start, disjoint

    @property
    def num_free(self) -> int:
        return sum(length for _, length in self._free)

    @property
    def largest_free_run(self) -> int:
        return max((length for _, length in self._free), default=0)

    def free_runs(self) -> list[tuple[int, int]]:
        """(start, length) of every run of free blocks, by start."""
        return [(start, length) for start, length in self._free]

    def allocate(self, n: int) -> int | None:
        """Start of a run of `n` free blocks, now taken; None when no run is long enough."""
        if n < 1:
            raise ValueError("allocate at least one block")
        for i, (start, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = [start + n, length - n]
                return start
        return None

    def reserve(self, start: int, n: int) -> None:
        """Take the exact run [start, start+n), which must be free."""
        for i, (fstart, flength) in enumerate(self._free):
            if fstart <= start and start + n <= fstart + flength:
                pieces = [[fstart, start - fstart], [start + n, fstart + flength - start - n]]
                self._free[i : i + 1] = [p for p in pieces if p[1] > 0]
                return
        raise ValueError(f"blocks [{start}, {start + n}) are not free")

    def extend(self, start: int, n_old: int, n_new: int) -> bool:
        """Grow the run [start, start+n_old) to n_new blocks in place, if the blocks after it are free."""
        end = start + n_old
        for i, (fstart, flength) in enumerate(self._free):
            if fstart == end and flength >= n_new - n_old:
                if flength == n_new - n_old:
                    del self._free[i]
                else:
                    self._free[i] = [fstart + n_new - n_old, flength - (n_new - n_old)]
                return True
            if fstart > end:
                break
        return False

    def free(self, start: int, n: int) -> None:
        if start < 0 or n < 1 or start + n > self.num_blocks:
            raise ValueError(f"blocks [{start}, {start + n}) are outside the pool")
        i = 0
        while i < len(self._free) and self._free[i][0] < start:
            i += 1
        prev_end = self._free[i - 1][0] + self._free[i - 1][1] if i else 0
        next_start = self._free[i][0] if i < len(self._free) else self.num_blocks
        if (i and prev_end > start) or start + n > next_start:
            raise ValueError(f"blocks [{start}, {start + n}) are already free")
        self._free.insert(i, [start, n])
        if i + 1 < len(self._free) and start + n == self._free[i + 1][0]:  # merge with the next run
            self._free[i][1] += self._free.pop(i + 1)[1]
        if i and prev_end == start:  # merge with the previous run
            self._free[i - 1][1] += self._free.pop(i)[1]


def default_kv_budget(sequence_bytes: int, max_num_seqs: int, weights_bytes: int, device: torch.device) -> int:
    """Bytes for the pool when none are configured: enough for `max_num_seqs` full-length
    sequences (`sequence_bytes` each), at most 80% of the free memory of a GPU; on a CPU at most
    twice the weights (but room for one full-length sequence) and never over 4 GiB (vLLM's CPU
    default)."""
    enough = max_num_seqs * sequence_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(enough, int(0.8 * free))
    # Traffic and the prefix cache end up touching every page of the pool, so on a CPU its size
    # is resident memory. A step over a pool twice the weights already reads more KV than
    # weights: more room buys little throughput, while a small model would hold gigabytes.
    return min(enough, max(2 * weights_bytes, sequence_bytes), 4 * 2**30)


class KVPool:
    """Preallocated keys and values for all sequences, divided into blocks of `block_size` slots."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (num_layers, num_kv_heads, num_blocks * block_size, head_dim)
        # torch.empty: on a CPU the pages are only touched (and so only cost RAM) once written.
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.bytes_per_slot = self.slot_bytes(num_layers, num_kv_heads, head_dim, dtype)

    @staticmethod
    def slot_bytes(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of one token's keys and values over all layers."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def from_budget(cls, budget_bytes: int, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                    dtype: torch.dtype, device: torch.device | str = "cpu") -> "KVPool":
        bytes_per_block = cls.slot_bytes(num_layers, num_kv_heads, head_dim, dtype) * block_size
        num_blocks = budget_bytes // bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"a KV budget of {budget_bytes} bytes holds no block of {bytes_per_block} bytes")
        return cls(num_layers, num_kv_heads, head_dim, num_blocks, block_size, dtype, device)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.bytes_per_slot

    def usage(self) -> float:
        return 1.0 - self.allocator.num_free / self.num_blocks

    def blocks_for(self, num_slots: int) -> int:
        return max(1, math.ceil(num_slots / self.block_size))

    def allocate(self, num_slots: int, max_capacity: int | None = None) -> "KVCache | None":
        """A cache of at least `num_slots` slots, or None when no run of blocks is free."""
        n = self.blocks_for(num_slots)
        start = self.allocator.allocate(n)
        if start is None:
            return None
        return KVCache(self, start, n, max_capacity)

    def view(self, start_block: int, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, e = start_block * self.block_size, (start_block + num_blocks) * self.block_size
        return self.keys[:, :, s:e], self.values[:, :, s:e]


class KVCache:
    """One sequence's keys and values: a run of the pool's blocks, `[layers, kv_heads, capacity, head_dim]`.

    Slots [0, length) hold committed tokens in order. A forward pass appends its rows after
    them; afterwards the engine keeps only what plain decoding would have cached, either by
    trimming (`truncate`) or by moving the accepted tree nodes into consecutive slots (`compact`).
    """

    GROWTH_CHUNK = 256  # slots added at least per growth, so growth is rare

    def __init__(self, pool: KVPool, start_block: int, num_blocks: int, max_capacity: int | None = None) -> None:
        self.pool = pool
        self.start_block = start_block
        self.num_blocks = num_blocks
        self.keys, self.values = pool.view(start_block, num_blocks)
        self.max_capacity = max(self.capacity, max_capacity or self.capacity)
        self.length = 0
        self.released = False

    @classmethod
    def standalone(cls, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                   device: torch.device | str = "cpu") -> "KVCache":
        """A cache with a pool of its own (measurements, tests)."""
        pool = KVPool(num_layers, num_kv_heads, head_dim, 1, capacity, dtype, device)
        return pool.allocate(capacity)  # type: ignore[return-value]

    @property
    def capacity(self) -> int:
        return self.num_blocks * self.pool.block_size

    @property
    def nbytes(self) -> int:
        return self.capacity * self.pool.bytes_per_slot

    def release(self) -> None:
        """Give the blocks back to the pool (idempotent)."""
        if not self.released:
            self.pool.allocator.free(self.start_block, self.num_blocks)
            self.released = True

    @torch.inference_mode()
    def ensure(self, needed: int) -> None:
        """Make room for `needed` slots, growing by at least GROWTH_CHUNK up to `max_capacity`.

        Raises `KVCacheFull` when the pool has no room; the cache is unchanged then."""
        if needed <= self.capacity:
            return
        if needed > self.max_capacity:
            raise RuntimeError(f"KV cache overflow: need {needed} slots, at most {self.max_capacity}")
        generous = min(self.max_capacity, max(needed, self.capacity + self.GROWTH_CHUNK))
        for slots in dict.fromkeys((generous, needed)):
            if self._resize(self.pool.blocks_for(slots)):
                return
        raise KVCacheFull(f"no free run of {self.pool.blocks_for(needed)} KV blocks")

    def _resize(self, n: int) -> bool:
        allocator = self.pool.allocator
        if allocator.extend(self.start_block, self.num_blocks, n):
            self.num_blocks = n
            self.keys, self.values = self.pool.view(self.start_block, n)
            return True
        # Move: free our run first, so a pool with one sequence in it can always take it back whole.
        allocator.free(self.start_block, self.num_blocks)
        start = allocator.allocate(n)
        if start is None:
            allocator.reserve(self.start_block, self.num_blocks)  # just freed, so still there
            return False
        old_k, old_v = self.keys[:, :, : self.length], self.values[:, :, : self.length]
        new_k, new_v = self.pool.view(start, n)
        if start < self.start_block + self.num_blocks and self.start_block < start + n:
            old_k, old_v = old_k.clone(), old_v.clone()  # the runs overlap
        new_k[:, :, : self.length] = old_k
        new_v[:, :, : self.length] = old_v
        self.start_block, self.num_blocks, self.keys, self.values = start, n, new_k, new_v
        return True

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def compact(self, base: int, kept_slots: list[int]) -> None:
        """Keep slots [0, base) plus `kept_slots` (ascending, all >= base), moved to follow `base`.

        Stale entries beyond the new length are left in place: the next forward overwrites them,
        so nothing is zeroed and no whole cache is ever copied.
        """
        compact_caches([(self, base, kept_slots)])


@torch.inference_mode()
def compact_caches(moves: list[tuple[KVCache, int, list[int]]]) -> None:
    """`KVCache.compact(base, kept_slots)` for each (cache, base, kept_slots), with one gather and
    one scatter per pool for all caches that share it: on a GPU one index upload per step instead
    of one per sequence."""
    by_pool: dict[int, tuple[KVPool, list[int], list[int]]] = {}
    for cache, base, kept in moves:
        cache.length = base + len(kept)
        if not kept or kept == list(range(base, base + len(kept))):
            continue  # already in place
        pool = cache.pool
        _, src, dst = by_pool.setdefault(id(pool), (pool, [], []))
        first = cache.start_block * pool.block_size  # the cache's slot 0 in the pool
        src += [first + s for s in kept]
        dst += range(first + base, first + base + len(kept))
    for pool, src, dst in by_pool.values():
        device = pool.keys.device
        index = torch.tensor([src, dst], dtype=torch.long, pin_memory=device.type == "cuda").to(device, non_blocking=True)
        # Gather first (index_select copies), so overlapping sources and destinations are safe;
        # caches are disjoint runs of the pool, so one sequence's moves never touch another's.
        pool.keys.index_copy_(2, index[1], pool.keys.index_select(2, index[0]))
        pool.values.index_copy_(2, index[1], pool.values.index_select(2, index[0]))
