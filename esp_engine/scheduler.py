"""Which sequences run in the next forward pass, with how many rows, and where their KV lives.

Continuous batching: every step, each decoding sequence contributes one block (its root plus
its draft rows, capped by its share of the pass), and what is left of the step's token budget
goes to prefill chunks of waiting or half-prefilled sequences, first come first served. KV
blocks are taken from the pool when a request is admitted and grown as it decodes; when the
pool runs dry, new requests wait, and a decoding sequence that cannot grow preempts the most
recently admitted one, whose KV is dropped and recomputed (one prefill pass) when it returns.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .cost_model import LoadTuner
from .errors import InvalidRequestError
from .kv_cache import KVCache, KVCacheFull, KVPool
from .prefix_cache import PrefixCache
from .sequence import Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Batching limits. `kv_cache_bytes` None means a default for the device (see `LLMEngine`)."""

    max_num_seqs: int = 64  # sequences admitted at once (prefilling or decoding)
    max_num_batched_tokens: int = 1024  # rows of one forward pass: decode blocks plus prefill chunks
    kv_cache_bytes: int | None = None
    block_size: int = 16  # KV slots per block
    max_rows_per_step: int | None = None  # decode rows of one pass; trees shrink to their share
    load_adaptive: bool = False  # pick each pass's share from measured step cost (`LoadTuner`)
    enable_prefix_caching: bool = False  # reuse the KV of prompt prefixes seen before (`PrefixCache`)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise InvalidRequestError("max_num_seqs must be at least 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise InvalidRequestError("max_num_batched_tokens must be at least max_num_seqs (one row each)")
        if self.block_size < 1:
            raise InvalidRequestError("block_size must be at least 1")
        if self.max_rows_per_step is not None and self.max_rows_per_step < 1:
            raise InvalidRequestError("max_rows_per_step must be at least 1")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise InvalidRequestError("kv_cache_bytes must be positive")


@dataclass(slots=True)
class PrefillChunk:
    seq: Sequence
    start: int  # first position of the chunk in the sequence's prefill target
    end: int

    @property
    def is_last(self) -> bool:
        return self.end == len(self.seq.prefill_ids)


@dataclass(slots=True)
class ScheduledStep:
    decode: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, most rows it may use)
    prefill: list[PrefillChunk] = field(default_factory=list)
    share: int | None = None  # the load tuner's rows per sequence, when it chose one
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: KVPool, block_rows: Callable[[Sequence], int],
                 prefill_slack: Callable[[Sequence], int], max_capacity: Callable[[Sequence], int],
                 tuner: LoadTuner | None = None, prefix_cache: PrefixCache | None = None) -> None:
        """`block_rows(seq)`: the most rows a sequence's decode block can have;
        `prefill_slack(seq)`: extra rows its last prefill chunk carries (ESP masks) plus room for
        its first decode block; `max_capacity(seq)`: the most KV slots it can ever need."""
        self.config = config
        self.pool = pool
        self.block_rows = block_rows
        self.prefill_slack = prefill_slack
        self.max_capacity = max_capacity
        self.tuner = tuner
        self.prefix_cache = prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: prefilling and decoding
        self.num_preemptions = 0

    # ---- membership ----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if self.max_capacity(seq) > self.pool.num_slots:
            raise InvalidRequestError(
                f"the request needs up to {self.max_capacity(seq)} KV slots but the whole KV cache holds "
                f"{self.pool.num_slots}; lower max_tokens or raise the KV cache size"
            )
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Forget a finished or aborted sequence and give its blocks back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)

    @staticmethod
    def _free(seq: Sequence) -> None:
        if seq.cache is not None:
            seq.cache.release()
            seq.cache = None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        cfg = self.config
        decoding = [s for s in self.running if s.status is SequenceStatus.RUNNING]
        caps = self._decode_caps(decoding, step)
        for seq in decoding:
            if seq.status is not SequenceStatus.RUNNING:  # preempted for an older one below
                continue
            if self._make_room(seq, seq.cache.length + caps[seq.req_id], step):
                step.decode.append((seq, caps[seq.req_id]))
        budget = cfg.max_num_batched_tokens - sum(rows for _, rows in step.decode)
        for seq in [s for s in self.running if s.status is SequenceStatus.PREFILLING]:
            budget = self._add_chunk(seq, budget, step)
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            cache = self._allocate(seq)
            if cache is None:
                break  # first come, first served: later requests do not overtake it
            self.waiting.popleft()
            seq.cache = cache
            if self.prefix_cache is not None:
                cached = self.prefix_cache.load(seq.prefill_ids, cache)
                if not seq.output_ids:  # a recomputation after preemption is not the client's prompt
                    seq.num_cached_tokens = cached
            seq.status = SequenceStatus.PREFILLING
            self.running.append(seq)
            budget = self._add_chunk(seq, budget, step)
        return step

    def _decode_caps(self, decoding: list[Sequence], step: ScheduledStep) -> dict[str, int]:
        cfg = self.config
        caps = {s.req_id: self.block_rows(s) for s in decoding}
        if not decoding:
            return caps
        share = None
        if self.tuner is not None:
            pending = sum(len(s.prefill_ids) - (s.cache.length if s.cache else 0)
                          for s in [*self.running, *self.waiting] if s.status is not SequenceStatus.RUNNING)
            extra = min(pending, cfg.max_num_batched_tokens // 2)
            share = self.tuner.choose([s.spec.method for s in decoding], list(caps.values()), extra)
        if cfg.max_rows_per_step is not None:
            share = min(share or cfg.max_rows_per_step, max(1, cfg.max_rows_per_step // len(decoding)))
        # Decode never takes the whole pass while requests wait: keep room for a prefill chunk.
        reserve = min(64, cfg.max_num_batched_tokens // 4) if (self.waiting or len(decoding) < len(self.running)) else 0
        fair = max(1, (cfg.max_num_batched_tokens - reserve) // len(decoding))
        if sum(caps.values()) > cfg.max_num_batched_tokens - reserve:
            share = min(share or fair, fair)
        if share is not None:
            caps = {k: max(1, min(v, share)) for k, v in caps.items()}
            step.share = share
        return caps

    def _make_room(self, seq: Sequence, needed: int, step: ScheduledStep) -> bool:
        """Grow `seq`'s cache to `needed` slots, preempting newer sequences while the pool is full.
        Returns False when `seq` itself had to be preempted."""
        while True:
            try:
                seq.cache.ensure(needed)
                return True
            except KVCacheFull:
                if self.prefix_cache is not None and self.prefix_cache.evict_one():
                    continue
                victim = next((s for s in reversed(self.running) if s is not seq), seq)
                self._preempt(victim, step)
                if victim is seq:
                    return False

    def _preempt(self, seq: Sequence, step: ScheduledStep) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)  # first in line to come back
        self.num_preemptions += 1
        step.preempted.append(seq)
        step.decode = [(s, r) for s, r in step.decode if s is not seq]
        step.prefill = [c for c in step.prefill if c.seq is not seq]

    def _allocate(self, seq: Sequence) -> KVCache | None:
        need = len(seq.prefill_ids) + self.prefill_slack(seq)
        limit = self.max_capacity(seq)
        while True:
            cache = self.pool.allocate(min(limit, need + KVCache.GROWTH_CHUNK), limit) or self.pool.allocate(need, limit)
            if cache is not None or self.prefix_cache is None or not self.prefix_cache.evict_one():
                return cache

    def _add_chunk(self, seq: Sequence, budget: int, step: ScheduledStep) -> int:
        start = seq.cache.length
        end = min(len(seq.prefill_ids), start + budget)
        if end > start:
            step.prefill.append(PrefillChunk(seq, start, end))
        return budget - (end - start)
