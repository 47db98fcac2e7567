"""Attention of one batched pass over the KV block pool, planned once per step.

Each sequence's cache is one run of consecutive pool slots, so its keys are a strided view that
SDPA reads in place. `BatchAttention` works out once per step where every row's key and value
go, so each layer stores a whole batch's with one indexed copy into the pool.

Attention itself stays one SDPA call per sequence, over exactly that sequence's keys. One call
over keys gathered into a padded [B, L] layout would save the per-call overhead, but it changes
the length each row's reductions run over, and with it their rounding: a request's tokens would
then depend on which other requests share its pass (docs/engine.md has the measurement). Output
that equals plain decoding of the request alone comes first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .kv_cache import KVCache


class BatchAttention:
    """Writes and attention for the rows of `caches` in one pass (rows of sequence b follow b-1's)."""

    def __init__(self, caches: Sequence[KVCache], attn_masks: Sequence[torch.Tensor | None], num_rows: Sequence[int],
                 device: torch.device) -> None:
        self.caches = list(caches)
        self.bounds: list[tuple[int, int]] = []  # rows of each sequence in the pass
        self.spans: list[tuple[int, int]] = []  # cache slots [old length, new length) of each sequence
        row = 0
        for cache, n in zip(caches, num_rows):
            cache.ensure(cache.length + n)  # may move the run: slots are read after this
            self.bounds.append((row, row + n))
            self.spans.append((cache.length, cache.length + n))
            row += n
        self.masks = [_full_mask(m, s0, n, device) for m, (s0, _), n in zip(attn_masks, self.spans, num_rows)]
        pool = caches[0].pool
        self.pool = pool if all(c.pool is pool for c in caches) else None
        # [R] pool slot of every row, when several sequences share one pool (for one, two slice
        # copies cost less than an indexed one).
        self.write_index: torch.Tensor | None = None
        if self.pool is not None and len(self.caches) > 1:
            starts = [c.start_block * pool.block_size for c in caches]
            self.write_index = torch.cat([torch.arange(b + s0, b + s1)
                                          for b, (s0, s1) in zip(starts, self.spans)]).to(device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the rows' keys and values ([R, kv_heads, D]) in their slots."""
        if self.write_index is not None:
            self.pool.keys[layer].index_copy_(1, self.write_index, k.transpose(0, 1))
            self.pool.values[layer].index_copy_(1, self.write_index, v.transpose(0, 1))
            return
        for cache, (r0, r1), (s0, s1) in zip(self.caches, self.bounds, self.spans):
            cache.keys[layer, :, s0:s1] = k[r0:r1].transpose(0, 1)
            cache.values[layer, :, s0:s1] = v[r0:r1].transpose(0, 1)

    def attend(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention output [R, heads, D] for the rows' queries [R, heads, D]."""
        gqa = q.shape[1] != self.caches[0].keys.shape[1]
        outs = []
        for cache, (r0, r1), (_, s1), mask in zip(self.caches, self.bounds, self.spans, self.masks):
            outs.append(F.scaled_dot_product_attention(
                q[r0:r1].transpose(0, 1)[None], cache.keys[layer, :, :s1][None], cache.values[layer, :, :s1][None],
                attn_mask=mask, is_causal=False, scale=scale, enable_gqa=gqa,
            )[0].transpose(0, 1))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def finish(self) -> None:
        """The caches now hold the pass's rows."""
        for cache, (_, s1) in zip(self.caches, self.spans):
            cache.length = s1


def _full_mask(block_mask: torch.Tensor | None, cache_len: int, num_rows: int, device: torch.device) -> torch.Tensor | None:
    """[M, cache_len + M] boolean mask: all of the cache, then the block's own pattern."""
    if num_rows == 1 and block_mask is None:
        return None  # one row sees everything: no mask at all is the fastest path
    if block_mask is None:
        block_mask = torch.ones(num_rows, num_rows, dtype=torch.bool, device=device).tril_()
    if cache_len == 0:
        return block_mask
    return torch.cat([torch.ones(num_rows, cache_len, dtype=torch.bool, device=device), block_mask], dim=1)
