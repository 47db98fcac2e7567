"""The static shape of a decode pass: buckets, padding, and the buffers a captured graph reads.

A CUDA graph replays fixed shapes at fixed addresses, so a decode pass is laid out in a bucket:
a batch size B (1, 2, 4, ..., 64) times rows per sequence R (1, 16, 32, 64), the smallest that
holds the step. Sequence b owns rows [b*R, (b+1)*R) of the pass, its real rows first; the rest
are padding, and so are all the rows of the sequences after the real ones. The tree is data: its
rows, mask, positions and KV slots are written into preallocated buffers before the pass, so any
tree of up to R rows runs the same graph (vLLM and SGLang capture verify graphs the same way:
../shared/docs/GPU_NOTES.md).

A padded row writes its key and value into the scratch slot, a pool slot no sequence owns,
attends to nothing but that slot, sits at position 0, and its output is never read, so it
changes no real row's result. (nano-vllm gives such rows slot -1, which its KV-store kernel
skips; an indexed copy cannot skip, so the scratch slot takes the writes.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .kv_cache import KVCache, KVCacheFull, KVPool

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_ROWS = (1, 16, 32, 64)  # plain decoding, then node budgets: ESP/hybrid bc10, bc30, bc60 fit 16, 32, 64


@dataclass(frozen=True, slots=True)
class Bucket:
    batch: int  # sequences in the pass, real and padding
    rows: int  # rows per sequence

    @property
    def num_rows(self) -> int:
        return self.batch * self.rows


@dataclass(frozen=True, slots=True)
class BucketLadder:
    """The buckets a padded pass may take: every batch size times every row count."""

    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    rows: tuple[int, ...] = DEFAULT_ROWS

    def __post_init__(self) -> None:
        for name, values in (("batch_sizes", self.batch_sizes), ("rows", self.rows)):
            if not values or min(values) < 1 or list(values) != sorted(set(values)):
                raise ValueError(f"bucket {name} must be distinct positive integers in ascending order, got {list(values)}")

    def choose(self, num_rows: Sequence[int]) -> Bucket | None:
        """The smallest bucket holding a pass whose sequences have `num_rows` rows each; None when
        the batch or one block is larger than any bucket (that pass runs unpadded)."""
        if not num_rows or min(num_rows) < 1:
            return None
        batch = next((b for b in self.batch_sizes if b >= len(num_rows)), None)
        rows = next((r for r in self.rows if r >= max(num_rows)), None)
        return None if batch is None or rows is None else Bucket(batch, rows)

    @property
    def largest(self) -> Bucket:
        return Bucket(self.batch_sizes[-1], self.rows[-1])

    def buckets(self) -> list[Bucket]:
        """Every bucket, most rows first: the order to capture graphs in, so that the smaller
        ones reuse memory the larger ones took."""
        return sorted((Bucket(b, r) for b in self.batch_sizes for r in self.rows), key=lambda k: (-k.num_rows, -k.batch))


@dataclass(slots=True)
class BlockRows:
    """One sequence's rows of a decode pass, as the model runner built them."""

    cache: KVCache
    embeds: torch.Tensor  # [n, hidden]
    positions: torch.Tensor  # [n] int64, on the host (decode blocks' are: `BlockLayout.offsets` is)
    attn: torch.Tensor | None  # [n, n] bool over the block's rows, True = may attend; None: causal


@dataclass(frozen=True, slots=True)
class BucketInputs:
    """What a pass in `bucket` reads: views of `StepBuffers`, the same tensors for every pass of
    that bucket (a captured graph holds their addresses). N = B*R rows."""

    bucket: Bucket
    embeds: torch.Tensor  # [N, hidden]
    positions: torch.Tensor  # [N] int64; 0 for padding
    slot_mapping: torch.Tensor  # [N] int64: the pool slot each row's key and value go to (scratch for padding)
    row_mask: torch.Tensor  # [B, R, R] bool: which rows of its own block a row sees (padding: only itself)
    is_real: torch.Tensor  # [N] bool
    ctx_lens: torch.Tensor  # [B] int64: cached tokens before the block, all visible to its real rows (0 for padding)
    kv_starts: torch.Tensor  # [B] int64: pool slot of the sequence's first cached token (scratch for padding)
    logits_index: torch.Tensor  # [N] int64: the real rows, sequence after sequence, then 0s
    bucket_rows: torch.Tensor  # [1] int64: R, as data (one compiled FlexAttention mask serves every bucket)


@dataclass(slots=True)
class StepLayout:
    """One step as laid out in its bucket; the host-side copy of what the buffers now hold."""

    inputs: BucketInputs
    caches: list[KVCache]  # the real sequences', in row order
    num_rows: list[int]  # real rows of each
    ctx_lens: list[int]
    kv_starts: list[int]
    attn_masks: list[torch.Tensor | None]  # as the blocks gave them
    scratch_slot: int

    @property
    def bucket(self) -> Bucket:
        return self.inputs.bucket

    @property
    def num_real_rows(self) -> int:
        return sum(self.num_rows)

    @property
    def real_rows(self) -> torch.Tensor:
        """[sum n] rows of the pass that belong to real sequences, in order."""
        return self.inputs.logits_index[: self.num_real_rows]

    def finish(self) -> None:
        """The caches now hold the pass's rows (the caller trims or compacts them afterwards)."""
        for cache, ctx, n in zip(self.caches, self.ctx_lens, self.num_rows):
            cache.length = ctx + n


class StepBuffers:
    """Preallocated inputs for the largest bucket of a ladder; a smaller bucket's pass reads a
    prefix of each. Steps are staged on the host and copied over in one go per buffer."""

    def __init__(self, largest: Bucket, hidden_size: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.largest = largest
        self.device = torch.device(device)
        n, b, r = largest.num_rows, largest.batch, largest.rows

        def dev(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=self.device)

        self.embeds = dev(n, hidden_size, dtype=dtype)  # zeros: padded rows stay finite whatever they last held
        self.positions, self.slot_mapping, self.logits_index = dev(n), dev(n), dev(n)
        self.row_mask, self.is_real = dev(b * r * r, dtype=torch.bool), dev(n, dtype=torch.bool)
        self.ctx_lens, self.kv_starts, self.bucket_rows = dev(b), dev(b), dev(1)
        pin = self.device.type == "cuda"
        self._staged = {name: torch.zeros_like(t, device="cpu").pin_memory() if pin else torch.zeros_like(t, device="cpu")
                        for name, t in self._host_side().items()}
        self._views: dict[Bucket, BucketInputs] = {}
        self._copied: torch.cuda.Event | None = None  # the last step's copies out of the staging tensors

    def _host_side(self) -> dict[str, torch.Tensor]:
        return {"positions": self.positions, "slot_mapping": self.slot_mapping, "logits_index": self.logits_index,
                "row_mask": self.row_mask, "is_real": self.is_real, "ctx_lens": self.ctx_lens,
                "kv_starts": self.kv_starts, "bucket_rows": self.bucket_rows}

    def inputs(self, bucket: Bucket) -> BucketInputs:
        """The views a pass in `bucket` reads (the same tensors every time)."""
        if bucket not in self._views:
            if bucket.batch > self.largest.batch or bucket.rows > self.largest.rows:
                raise ValueError(f"bucket {bucket} is larger than these buffers ({self.largest})")
            n, b, r = bucket.num_rows, bucket.batch, bucket.rows
            self._views[bucket] = BucketInputs(
                bucket, self.embeds[:n], self.positions[:n], self.slot_mapping[:n], self.row_mask[: b * r * r].view(b, r, r),
                self.is_real[:n], self.ctx_lens[:b], self.kv_starts[:b], self.logits_index[:n], self.bucket_rows)
        return self._views[bucket]

    def lay_out(self, bucket: Bucket, blocks: Sequence[BlockRows], scratch_slot: int) -> StepLayout:
        """Write `blocks` into the buffers of `bucket`, padded. Each cache first makes room for its
        rows (which may move its run, so slots are read after that); with no blocks at all every
        row is padding (how a graph is captured)."""
        b_max, r_max = bucket.batch, bucket.rows
        if len(blocks) > b_max or any(blk.embeds.shape[0] > r_max for blk in blocks):
            raise ValueError(f"{len(blocks)} blocks of up to {max(blk.embeds.shape[0] for blk in blocks)} rows "
                             f"do not fit bucket {bucket}")
        inputs = self.inputs(bucket)
        if self._copied is not None:
            self._copied.synchronize()  # the staging tensors are about to be overwritten
        staged = {name: t[: getattr(inputs, name).numel()] for name, t in self._staged.items()}
        positions, slots, logits_index = staged["positions"], staged["slot_mapping"], staged["logits_index"]
        row_mask, is_real = staged["row_mask"].view(b_max, r_max, r_max), staged["is_real"]
        positions.zero_()
        slots.fill_(scratch_slot)
        logits_index.zero_()
        row_mask.zero_()
        row_mask.diagonal(dim1=1, dim2=2).fill_(True)  # padding sees its own write (the scratch slot)
        is_real.zero_()
        ctx_lens, kv_starts, num_rows, masks, real_rows = [0] * b_max, [scratch_slot] * b_max, [], [], []
        for b, blk in enumerate(blocks):
            cache, n = blk.cache, blk.embeds.shape[0]
            cache.ensure(cache.length + n)
            r0, start = b * r_max, cache.start_block * cache.pool.block_size
            positions[r0 : r0 + n] = blk.positions
            slots[r0 : r0 + n] = torch.arange(start + cache.length, start + cache.length + n)
            row_mask[b, :n, :n] = blk.attn if blk.attn is not None else torch.ones(n, n, dtype=torch.bool).tril_()
            is_real[r0 : r0 + n] = True
            ctx_lens[b], kv_starts[b] = cache.length, start
            num_rows.append(n)
            masks.append(blk.attn)
            real_rows.extend(range(r0, r0 + n))
        logits_index[: len(real_rows)] = torch.tensor(real_rows, dtype=torch.long)
        staged["ctx_lens"].copy_(torch.tensor(ctx_lens, dtype=torch.long))
        staged["kv_starts"].copy_(torch.tensor(kv_starts, dtype=torch.long))
        staged["bucket_rows"].fill_(r_max)
        for name, t in staged.items():
            view = getattr(inputs, name)
            view.view(-1).copy_(t, non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        if blocks:
            inputs.embeds.index_copy_(0, inputs.logits_index[: len(real_rows)], torch.cat([blk.embeds for blk in blocks]))
        return StepLayout(inputs, [blk.cache for blk in blocks], num_rows, ctx_lens[: len(blocks)],
                          kv_starts[: len(blocks)], masks, scratch_slot)


def take_scratch_slot(pool: KVPool) -> int:
    """A block of `pool` that no sequence will ever own (its first slot takes padded rows'
    writes), zeroed so that whatever reads it reads finite numbers. Held for the pool's life."""
    start = pool.allocator.allocate(1)
    if start is None:
        raise KVCacheFull("no free KV block for the padded passes' scratch slot")
    slot = start * pool.block_size
    pool.keys[:, :, slot : slot + pool.block_size].zero_()
    pool.values[:, :, slot : slot + pool.block_size].zero_()
    return slot
