"""Which sequences run in the next forward pass, with how many rows, and where their KV lives.

Continuous batching: every step, each decoding sequence contributes one block (its root plus
its draft rows, capped by its share of the pass), and what is left of the step's token budget
goes to prefill chunks of waiting or half-prefilled sequences, first come first served. KV
blocks are taken from the pool when a request is admitted and grown as it decodes; when the
pool runs dry, new requests wait, and a decoding sequence that cannot grow preempts the most
recently admitted one, whose KV is dropped and recomputed (one prefill pass) when it returns.

The scheduler is also the one owner of a sequence's life: `update` commits what the model
runner chose (stopping on EOS, stop ids and max_new_tokens inside an accepted run), finishes,
fails and removes sequences, and gives the load tuner its one feedback call per pass.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .cost_model import LoadTuner, PassFeedback, SequenceFeedback
from .errors import InvalidRequestError
from .kv_cache import KVCache, KVCacheFull, KVPool
from .outputs import RequestOutput, StepStats
from .prefix_cache import PrefixCache
from .proposers.base import DraftBudget, always_pays
from .sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from .model_runner import SequenceResult, StepResult

log = logging.getLogger(__name__)


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
class DecodeSlot:
    seq: Sequence
    budget: DraftBudget  # the rows this step allows its block


@dataclass(slots=True)
class StepPlan:
    """One forward pass: a block per decoding sequence and prefill chunks, in row order."""

    decode: list[DecodeSlot] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)
    share: int | None = None  # the load tuner's rows per sequence, when it chose one
    started: float = field(default_factory=time.perf_counter)  # when scheduling began (the tuner times the whole step)

    @property
    def is_empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: KVPool, max_model_len: int, eos_token_ids: tuple[int, ...] = (),
                 tuner: LoadTuner | None = None, prefix_cache: PrefixCache | None = None) -> None:
        self.config = config
        self.pool = pool
        self.max_model_len = max_model_len
        self.eos_token_ids = tuple(eos_token_ids)
        self.tuner = tuner
        self.prefix_cache = prefix_cache
        self.requests: dict[str, Sequence] = {}  # every unfinished sequence, by request id
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: prefilling and decoding
        self.num_preemptions = 0
        self.newly_scheduled: list[str] = []  # requests the latest `schedule` admitted for the first time

    # ---- membership ----------------------------------------------------------------------
    def max_capacity(self, seq: Sequence) -> int:
        """The most KV slots `seq` can ever need."""
        longest = min(len(seq.prompt_ids) + seq.sampling.max_new_tokens, self.max_model_len)
        return longest + seq.proposer.prefill_slack

    def add(self, seq: Sequence) -> None:
        if seq.req_id in self.requests:
            raise InvalidRequestError(f"request id {seq.req_id!r} is already in use")
        if self.max_capacity(seq) > self.pool.num_slots:
            raise InvalidRequestError(
                f"the request needs up to {self.max_capacity(seq)} KV slots but the whole KV cache holds "
                f"{self.pool.num_slots}; lower max_tokens or raise the KV cache size"
            )
        self.requests[seq.req_id] = seq
        self.waiting.append(seq)

    def get(self, req_id: str) -> Sequence | None:
        return self.requests.get(req_id)

    def abort(self, req_id: str) -> bool:
        """Forget a request and free its KV cache. Returns whether it existed."""
        seq = self.requests.get(req_id)
        if seq is None:
            return False
        seq.finish_reason = seq.finish_reason or "abort"
        self._remove(seq)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def _remove(self, seq: Sequence) -> None:
        """Forget a finished or aborted sequence and give its blocks back."""
        seq.status = SequenceStatus.FINISHED
        self.requests.pop(seq.req_id, None)
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

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        step = StepPlan()
        self.newly_scheduled = []
        cfg = self.config
        decoding = [s for s in self.running if s.status is SequenceStatus.RUNNING]
        caps = self._decode_caps(decoding, step)
        pays = self.tuner.pays_alone if self.tuner is not None else always_pays
        for seq in decoding:
            if seq.status is not SequenceStatus.RUNNING:  # preempted for an older one below
                continue
            cap = caps[seq.req_id]
            if self._make_room(seq, seq.cache.length + cap, step):
                step.decode.append(DecodeSlot(seq, DraftBudget(cap, max(0, seq.remaining - 1), pays)))
        budget = cfg.max_num_batched_tokens - sum(slot.budget.max_rows for slot in step.decode)
        for seq in [s for s in self.running if s.status is SequenceStatus.PREFILLING]:
            budget = self._add_chunk(seq, budget, step)
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            cache = self._allocate(seq)
            if cache is None:
                break  # first come, first served: later requests do not overtake it
            self.waiting.popleft()
            seq.cache = cache
            if self.prefix_cache is not None and seq.sampling.prompt_logprobs is None:  # scoring reads every prompt row
                cached = self.prefix_cache.load(seq.prefill_ids, cache)
                if not seq.output_ids:  # a recomputation after preemption is not the client's prompt
                    seq.num_cached_tokens = cached
            seq.status = SequenceStatus.PREFILLING
            if not seq.was_scheduled:
                seq.was_scheduled = True
                self.newly_scheduled.append(seq.req_id)
            self.running.append(seq)
            budget = self._add_chunk(seq, budget, step)
        return step

    def _decode_caps(self, decoding: list[Sequence], step: StepPlan) -> dict[str, int]:
        cfg = self.config
        caps = {s.req_id: s.proposer.max_block_rows for s in decoding}
        if not decoding:
            return caps
        share = None
        if self.tuner is not None:
            pending = sum(len(s.prefill_ids) - (s.cache.length if s.cache else 0)
                          for s in [*self.running, *self.waiting] if s.status is not SequenceStatus.RUNNING)
            extra = min(pending, cfg.max_num_batched_tokens // 2)
            share = self.tuner.choose([s.proposer.tuner_key for s in decoding], list(caps.values()), extra)
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

    def _make_room(self, seq: Sequence, needed: int, step: StepPlan) -> bool:
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

    def _preempt(self, seq: Sequence, step: StepPlan) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)  # first in line to come back
        self.num_preemptions += 1
        step.decode = [slot for slot in step.decode if slot.seq is not seq]
        step.prefill = [c for c in step.prefill if c.seq is not seq]

    def _allocate(self, seq: Sequence) -> KVCache | None:
        need = len(seq.prefill_ids) + seq.proposer.prefill_slack
        limit = self.max_capacity(seq)
        while True:
            cache = self.pool.allocate(min(limit, need + KVCache.GROWTH_CHUNK), limit) or self.pool.allocate(need, limit)
            if cache is not None or self.prefix_cache is None or not self.prefix_cache.evict_one():
                return cache

    def _add_chunk(self, seq: Sequence, budget: int, step: StepPlan) -> int:
        start = seq.cache.length
        end = min(len(seq.prefill_ids), start + budget)
        if end > start:
            step.prefill.append(PrefillChunk(seq, start, end))
        return budget - (end - start)

    # ---- after the pass ------------------------------------------------------------------
    def update(self, plan: StepPlan, result: "StepResult") -> list[RequestOutput]:
        """Commit what the pass chose, finish what ended, and tell the load tuner what the pass did."""
        outputs: list[RequestOutput] = []
        learnt: list[SequenceFeedback] = []
        for part in result.sequences:
            seq = self.requests[part.req_id]
            try:
                out = self._apply(seq, part, learnt)
            except Exception as exc:
                out = self._fail(seq, exc)
            if out is not None:
                outputs.append(out)
                if out.finished:
                    self._remove(seq)
        if self.tuner is not None and plan.share is not None:
            decode_only = bool(plan.decode) and not plan.prefill
            # Prefill chunks would blur the pass's cost (their attention grows with the prompt):
            # only decode-only passes teach the tuner how far its cost model is off.
            self.tuner.observe(PassFeedback(
                num_sequences=len(plan.decode), num_rows=result.num_rows, is_speculative=result.is_speculative,
                seconds=time.perf_counter() - plan.started if decode_only else None,
                num_committed=sum(f.tokens for f in learnt), sequences=learnt,
            ))
        return outputs

    def _apply(self, seq: Sequence, part: "SequenceResult", learnt: list[SequenceFeedback]) -> RequestOutput | None:
        if part.error is not None:
            return self._fail(seq, part.error)
        if part.decode is None:  # a prefill chunk
            if part.prompt_logprobs is not None:  # a chunk prefilled anew after a preemption replaces its entries
                seq.prompt_logprobs = (seq.prompt_logprobs or [None])[: part.prompt_start + 1] + part.prompt_logprobs
            if not part.prefill_done:
                return None
            seq.status = SequenceStatus.RUNNING
            if seq.output_ids:  # recomputed after a preemption: the next step decodes from here
                return None
            if self.prefix_cache is not None:
                self.prefix_cache.store(seq.prompt_ids, seq.cache)
            if seq.sampling.max_new_tokens == 0:  # scoring only: the prompt's log-probabilities are the answer
                seq.finish_reason = "length"
                out = self._output(seq, [], None, None, None)
            else:
                seq.proposer.on_prefill(part.readout)
                out = self._commit(seq, part.token_ids, part.logprobs, step=None)
            out.prompt_logprobs = seq.prompt_logprobs
            return out
        outcome = part.decode
        draft, verdict = outcome.draft, outcome.verdict
        seq.proposer.observe(draft, outcome.layout, part.readout, verdict)
        step = StepStats(seq.spec.method, draft.tree.num_nodes, verdict.num_accepted, 0, outcome.layout.num_rows)
        out = self._commit(seq, part.token_ids, part.logprobs, step)
        learnt.append(SequenceFeedback(draft.tuner_keys, outcome.max_rows, step.num_committed, step.block_rows))
        return out

    def _commit(self, seq: Sequence, tokens: list[int], logprobs: list[dict] | None,
                step: StepStats | None) -> RequestOutput:
        """Append tokens one by one, honouring EOS, stop ids and max_new_tokens inside the run.

        Tokens after a stop are discarded with their KV (the sequence ends) and usage."""
        sampling = seq.sampling
        stop_ids = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        kept: list[int] = []
        stop_token: int | None = None
        for token in tokens:
            if token in stop_ids:
                seq.finish_reason, stop_token = "stop", token
                break
            kept.append(token)
            if len(seq.output_ids) + len(kept) >= sampling.max_new_tokens:
                seq.finish_reason = "length"
                break
        if step is not None:
            step.num_committed = len(kept) + (stop_token is not None)
        seq.output_ids.extend(kept)
        seq.proposer.on_commit(kept)
        # The stop token was generated too (usage counts it): its log-probability comes last.
        num_scored = len(kept) + (stop_token is not None)
        return self._output(seq, kept, logprobs[:num_scored] if logprobs and num_scored else None, step, stop_token)

    @staticmethod
    def _output(seq: Sequence, kept: list[int], logprobs: list[dict] | None, step: StepStats | None,
                stop_token: int | None) -> RequestOutput:
        return RequestOutput(seq.req_id, kept, seq.finish_reason is not None, seq.finish_reason, len(seq.prompt_ids),
                             len(seq.output_ids), logprobs, step, stop_token, num_cached_tokens=seq.num_cached_tokens)

    @staticmethod
    def _fail(seq: Sequence, exc: Exception) -> RequestOutput:
        log.error("request %s failed", seq.req_id, exc_info=exc)
        seq.finish_reason = "error"
        return RequestOutput(seq.req_id, [], True, "error", len(seq.prompt_ids), len(seq.output_ids), error=exc)
