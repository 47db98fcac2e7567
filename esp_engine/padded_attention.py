"""Attention of a padded decode pass (`step_buckets`): three backends behind one interface.

Each one stores the keys and values of all N rows of the pass with one indexed copy into the
pool (`slot_mapping`: real rows to their sequence's next slots, padding to the scratch slot),
then attends; `LlamaFamilyModel.forward_rows` calls `write(layer, k, v)`, `attend(layer, q,
scale)` and `finish()`.

- `SequenceAttention` (the CPU default): one attention call per real sequence over exactly its own
  cache, the very calls `BatchAttention` makes, so every real row gets bit for bit what the
  unpadded pass gives it. It loops over sequences in Python: eager only.
- `GatheredAttention`: one SDPA call per layer for the whole batch. Each sequence's cached keys
  are gathered from the pool into [B, context bucket + R] under one [B, R, L] mask. Capturable;
  it copies every sequence's cached keys and values once per layer.
- `FlexBlockAttention`: one FlexAttention call per layer over the pool in place. Its block mask
  says which KV blocks each query block reads (the runs of its sequences) and its `mask_mod`
  which slots each row sees (the context, then the tree). Capturable; it reads only the blocks
  it needs, and wants `torch.compile` (on CUDA it is compiled; eager, as on a CPU in the
  tests, it materialises the whole score matrix).

The batched two change each row's reduction lengths, and with them its rounding (docs/engine.md):
they are for the GPU, where a pass of one call per layer is what makes rows nearly free.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import BatchAttention
from .kv_cache import KVPool
from .step_buckets import BucketInputs, StepBuffers, StepLayout

BACKENDS = ("sequence", "gathered", "flex")


def default_backend(device: torch.device) -> str:
    """Exact per-sequence calls on a CPU; one batched SDPA call per layer on a GPU (FlexAttention
    is the other candidate there: scripts/gpu_bench.py measures both)."""
    return "gathered" if device.type == "cuda" else "sequence"


class SequenceAttention(BatchAttention):
    """`BatchAttention`'s per-sequence calls, over the padded rows of `layout`. Padded rows
    attend to nothing (their output is zero and never read)."""

    def __init__(self, layout: StepLayout, pool: KVPool) -> None:
        super().__init__(layout.caches, layout.attn_masks, layout.num_rows, layout.inputs.embeds.device)
        rows = layout.bucket.rows
        self.bounds = [(b * rows, b * rows + n) for b, n in enumerate(layout.num_rows)]
        self.pool, self.write_index = pool, layout.inputs.slot_mapping
        self.real_rows = layout.real_rows

    def attend(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        out = q.new_zeros(q.shape)
        return out.index_copy_(0, self.real_rows, super().attend(layer, q, scale))

    def finish(self) -> None:
        """Nothing: the padded pass's caller finishes the layout (`StepLayout.finish`)."""


class _PoolWrites:
    """The batched backends' shared part: writes by `slot_mapping`, and grouped-query heads."""

    def __init__(self, pool: KVPool, inputs: BucketInputs, scratch_slot: int) -> None:
        self.pool, self.inputs, self.scratch_slot = pool, inputs, scratch_slot

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if layer == 0:
            self.prepare()
        self.pool.keys[layer].index_copy_(1, self.inputs.slot_mapping, k.transpose(0, 1))
        self.pool.values[layer].index_copy_(1, self.inputs.slot_mapping, v.transpose(0, 1))

    def prepare(self) -> None:
        """Per-pass tensors every layer shares, from the buffers (inside a captured graph)."""

    def fill(self, layout: StepLayout) -> None:
        """Host-side per-step data beyond the buffers, before the pass."""

    def finish(self) -> None:
        """Nothing: the caller finishes the layout."""


class GatheredAttention(_PoolWrites):
    """One SDPA call per layer: keys of sequence b are its first `context` cached slots (those
    past its length point at the scratch slot, masked), then its block's R slots."""

    def __init__(self, pool: KVPool, inputs: BucketInputs, scratch_slot: int, context: int) -> None:
        super().__init__(pool, inputs, scratch_slot)
        self.context = context
        self.offsets = torch.arange(context, device=inputs.embeds.device)
        self.index: torch.Tensor | None = None  # [B, context + R] pool slots
        self.mask: torch.Tensor | None = None  # [B, 1, g*R, context + R]

    def prepare(self) -> None:
        inputs, (b, r) = self.inputs, (self.inputs.bucket.batch, self.inputs.bucket.rows)
        cached = self.offsets[None] < inputs.ctx_lens[:, None]  # [B, C]
        ctx_slots = torch.where(cached, inputs.kv_starts[:, None] + self.offsets[None], self.scratch_slot)
        self.index = torch.cat([ctx_slots, inputs.slot_mapping.view(b, r)], dim=1)
        sees_context = cached[:, None, :] & inputs.is_real.view(b, r, 1)  # padding sees no context
        self.mask = torch.cat([sees_context, inputs.row_mask], dim=2)[:, None]  # [B, 1, R, L]

    def attend(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        (b, r), (n, heads, d) = (self.inputs.bucket.batch, self.inputs.bucket.rows), q.shape
        kv_heads = self.pool.keys.shape[1]
        group = heads // kv_heads
        keys = self.pool.keys[layer][:, self.index].transpose(0, 1)  # [B, kvh, L, D]
        values = self.pool.values[layer][:, self.index].transpose(0, 1)
        # Query heads of one KV head as extra query rows: [B, kvh, g*R, D] (head h reads KV head h // g).
        qg = q.view(b, r, kv_heads, group, d).permute(0, 2, 3, 1, 4).reshape(b, kv_heads, group * r, d)
        mask = self.mask if group == 1 else self.mask.expand(b, group, r, -1).reshape(b, 1, group * r, -1)
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=scale)
        return out.view(b, kv_heads, group, r, d).permute(0, 3, 1, 2, 4).reshape(n, heads, d)


_compiled_flex = None


def _flex_attention(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if not compiled:
        return flex_attention
    if _compiled_flex is None:
        # Dynamic shapes, and one mask function reading the buffers for every bucket: a few
        # compilations serve the whole ladder instead of one per bucket.
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


def flex_mask_mod(buffers: StepBuffers, scratch_slot: int):
    """FlexAttention's `mask_mod` for every padded pass over `buffers`: a real row of sequence b
    sees b's cached slots, then the slots of its block's rows its tree mask allows; a padded row
    sees the scratch slot alone. The bucket's rows per sequence are read from the buffers too."""
    bucket_rows, is_real, kv_starts = buffers.bucket_rows, buffers.is_real, buffers.kv_starts
    ctx_lens, row_mask = buffers.ctx_lens, buffers.row_mask

    def mask_mod(b, h, q_idx, kv_idx):
        rows = bucket_rows[0]
        seq, pos = q_idx // rows, q_idx % rows
        real = is_real[q_idx]
        rel = kv_idx - kv_starts[seq]
        ctx = ctx_lens[seq]
        in_context = (rel >= 0) & (rel < ctx)
        blk = rel - ctx
        col = torch.minimum(blk.clamp(min=0), rows - 1)
        in_block = (blk >= 0) & (blk < rows) & row_mask[(seq * rows + pos) * rows + col]
        return ((in_context | in_block) & real) | ((kv_idx == scratch_slot) & ~real)

    return mask_mod


class FlexBlockAttention(_PoolWrites):
    """FlexAttention over the whole pool: queries [1, H, N, D], keys the pool's [1, kvh, slots, D];
    `mask_mod` from `flex_mask_mod` (the same for every bucket of one set of buffers)."""

    def __init__(self, pool: KVPool, inputs: BucketInputs, scratch_slot: int, mask_mod, compiled: bool,
                 q_block: int = 128, kv_block: int = 128) -> None:
        from torch.nn.attention.flex_attention import BlockMask

        super().__init__(pool, inputs, scratch_slot)
        device = inputs.embeds.device
        n, slots = inputs.bucket.num_rows, pool.num_slots
        self.q_block, self.kv_block = q_block, kv_block
        num_q, num_kv = math.ceil(n / q_block), math.ceil(slots / kv_block)
        self.kv_num_blocks = torch.zeros(1, 1, num_q, dtype=torch.int32, device=device)
        self.kv_indices = torch.zeros(1, 1, num_q, num_kv, dtype=torch.int32, device=device)
        self.block_mask = BlockMask.from_kv_blocks(self.kv_num_blocks, self.kv_indices, BLOCK_SIZE=(q_block, kv_block),
                                                   mask_mod=mask_mod, seq_lengths=(n, slots), compute_q_blocks=False)
        self._flex = _flex_attention(compiled)

    def fill(self, layout: StepLayout) -> None:
        """Which KV blocks each query block reads: its sequences' runs (context and block), and
        the scratch slot's block where it has padded rows."""
        rows, n, qb, kb = layout.bucket.rows, layout.bucket.num_rows, self.q_block, self.kv_block
        num_q = self.kv_num_blocks.shape[-1]
        counts = torch.zeros(num_q, dtype=torch.int32)
        indices = torch.zeros(num_q, self.kv_indices.shape[-1], dtype=torch.int32)
        for q in range(num_q):
            r0, r1 = q * qb, min(n, (q + 1) * qb)
            blocks: set[int] = set()
            padded = False
            for b in range(r0 // rows, (r1 - 1) // rows + 1):
                lo, hi = max(r0, b * rows), min(r1, (b + 1) * rows)  # this q block's rows of sequence b
                real = layout.num_rows[b] if b < len(layout.num_rows) else 0
                if real > lo - b * rows:
                    start, end = layout.kv_starts[b], layout.kv_starts[b] + layout.ctx_lens[b] + real
                    blocks.update(range(start // kb, (end - 1) // kb + 1))
                padded |= hi - b * rows > real
            if padded:
                blocks.add(self.scratch_slot // kb)
            ordered = sorted(blocks)
            counts[q] = len(ordered)
            indices[q, : len(ordered)] = torch.tensor(ordered, dtype=torch.int32)
        self.kv_num_blocks.view(-1).copy_(counts, non_blocking=True)
        self.kv_indices.view(num_q, -1).copy_(indices, non_blocking=True)

    def attend(self, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        keys, values = self.pool.keys[layer][None], self.pool.values[layer][None]
        gqa = q.shape[1] != keys.shape[1]
        out = self._flex(q.transpose(0, 1)[None], keys, values, block_mask=self.block_mask, scale=scale, enable_gqa=gqa)
        return out[0].transpose(0, 1)
