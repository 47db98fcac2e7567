"""Attention of one batched pass over the KV block pool, planned once per step.

Each sequence's cache is one run of consecutive pool slots, so its keys are a strided view that
SDPA reads in place. `BatchAttention` works out once per step where every row's key and value
go, so each layer stores a whole batch's with one indexed copy into the pool.

Attention itself stays one call per sequence, over exactly that sequence's keys. One call over
keys gathered into a padded [B, L] layout would save the per-call overhead, but it changes the
length each row's reductions run over, and with it their rounding: a request's tokens would then
depend on which other requests share its pass (docs/engine.md has the measurement). Output that
equals plain decoding of the request alone comes first.

On a CPU that call is `InvariantAttention`, which gives a row the same bits whatever else its
call holds, so that speculation is identical to plain decoding in every dtype; on a GPU it is SDPA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import cpu_kernels
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
        self.invariant = device.type == "cpu"
        # With `invariant`, built at the first layer, which tells the number of query heads.
        self.per_sequence: list[InvariantAttention] | None = None
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
        if self.invariant:
            if self.per_sequence is None:
                _, kv_heads, _, head_dim = self.caches[0].keys.shape
                self.per_sequence = [InvariantAttention(mask, r1 - r0, s1, q.shape[1], kv_heads, head_dim, q.device,
                                                        q.dtype)
                                     for (r0, r1), (_, s1), mask in zip(self.bounds, self.spans, self.masks)]
            outs = [attend(q[r0:r1], cache.keys[layer, :, :s1], cache.values[layer, :, :s1], scale)
                    for attend, cache, (r0, r1), (_, s1) in zip(self.per_sequence, self.caches, self.bounds, self.spans)]
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        gqa = q.shape[1] != self.caches[0].keys.shape[1]
        outs = []
        for cache, (r0, r1), (_, s1), mask in zip(self.caches, self.bounds, self.spans, self.masks):
            outs.append(F.scaled_dot_product_attention(
                q[r0:r1].transpose(0, 1)[None], cache.keys[layer, :, :s1][None], cache.values[layer, :, :s1][None],
                attn_mask=mask, is_causal=False, scale=scale, enable_gqa=gqa,
            )[0].transpose(0, 1))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def layout(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int], list[int], list[torch.Tensor | None]]:
        """What `cpu_kernels.CpuDecoder.forward` takes instead of `write` and `attend` per layer:
        each sequence's keys and values, the pass's row bounds, each sequence's first new slot,
        and its mask [rows, slots seen] (None: all)."""
        bounds = [0] + [r1 for _, r1 in self.bounds]
        masks = [None if m is None else m.contiguous() for m in self.masks]
        return ([c.keys for c in self.caches], [c.values for c in self.caches], bounds, [s0 for s0, _ in self.spans],
                masks)

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
    block_mask = block_mask.to(device, non_blocking=True)  # layouts are built (and cached) on the host
    if cache_len == 0:
        return block_mask
    return torch.cat([torch.ones(num_rows, cache_len, dtype=torch.bool, device=device), block_mask], dim=1)


# Query rows per score matmul: few enough that a chunk's scores stay small at long contexts. And
# the fewest rows a score matmul is given: the library rounds a call of fewer rows differently
# (as `row_invariance` finds for the linears).
_CHUNK_ROWS = 64
_MIN_SCORE_ROWS = 16


class InvariantAttention:
    """One sequence's attention in a pass on a CPU: each row gets the same bits whatever else its
    call holds.

    Where our CPU kernels run (`cpu_kernels.attention`), each row's keys are listed in slot order
    and everything runs over that list in float32 in a fixed order: a tree node's list is the one
    its token has alone, so the bits are the same by construction. Elsewhere (`use_kernel`
    False) torch ops do it. The fused SDPA kernel rounds a row differently when its call holds
    other rows or masked keys (a tree's siblings sit between a node's ancestors), and its one-row
    bf16 path is slow. Here
    the query heads that share a key head are rows of one float32 `baddbmm` (products of bf16
    values are exact in float32), padded to `_MIN_SCORE_ROWS`, whose bias holds the mask: each
    score is then the same dot product in any call. Softmax and the value matmul run in float64
    and round once to the dtype: their sums still run in an order that depends on the call, but
    float64 leaves such differences some 29 bits below float32's rounding, so they do not reach
    the result (docs/engine.md, "Row invariance").

    Chunks of `_CHUNK_ROWS` rows read only the keys up to their last row unless some row sees a
    later one (causal prefill and trees, whose nodes follow their parents, never do).
    """

    def __init__(self, visible: torch.Tensor | None, rows: int, length: int, heads: int, kv_heads: int,
                 head_dim: int, device: torch.device, dtype: torch.dtype = torch.float32,
                 use_kernel: bool | None = None) -> None:
        self.visible, self.group, self.shape = visible, heads // kv_heads, (heads, kv_heads, head_dim)
        if use_kernel is None:
            use_kernel = device.type == "cpu" and cpu_kernels.supports_attention(dtype, head_dim)
        self.use_kernel = use_kernel
        if use_kernel:
            return
        sees_later = visible is not None and rows > _CHUNK_ROWS and bool(visible[:, length - rows:].triu(1).any())
        self.chunks = []  # (first row, end row, keys seen)
        for r0 in range(0, rows, _CHUNK_ROWS):
            r1 = min(rows, r0 + _CHUNK_ROWS)
            self.chunks.append((r0, r1, length if sees_later else length - (rows - r1)))
        padded = max(_MIN_SCORE_ROWS, self.group * min(rows, _CHUNK_ROWS))
        self.queries = torch.zeros(kv_heads, padded, head_dim, device=device)
        # One chunk (every decode and verify pass) keeps its bias for all layers; a long prefill
        # builds each chunk's when it gets there, since all of them at once would be quadratic.
        self.bias = self._bias(*self.chunks[0]) if len(self.chunks) == 1 else None

    def _bias(self, r0: int, r1: int, seen: int) -> torch.Tensor:
        bias = torch.zeros(self.queries.shape[1], seen, device=self.queries.device)
        if self.visible is not None:
            hidden = ~self.visible[r0:r1, :seen]
            bias[: self.group * (r1 - r0)].masked_fill_(hidden.repeat(self.group, 1), float("-inf"))
        return bias

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        """Output [M, heads, D] of queries [M, heads, D] over keys and values [kv_heads, L, D]."""
        if self.use_kernel:
            return cpu_kernels.attention(q, keys, values, self.visible, scale)
        heads, kv_heads, d = self.shape
        keys_t, values = keys.float().transpose(1, 2), values.double()
        outs = []
        for r0, r1, seen in self.chunks:
            n = self.group * (r1 - r0)
            self.queries[:, :n].copy_(q[r0:r1].transpose(0, 1).reshape(kv_heads, n, d))
            bias = self.bias if self.bias is not None else self._bias(r0, r1, seen)
            scores = torch.baddbmm(bias, self.queries, keys_t[:, :, :seen], alpha=scale)
            probs = torch.softmax(scores[:, :n].double(), dim=-1)
            out = torch.bmm(probs, values[:, :seen]).to(q.dtype)
            outs.append(out.view(heads, r1 - r0, d).transpose(0, 1))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
