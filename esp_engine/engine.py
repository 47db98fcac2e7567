"""The engine: requests in, committed tokens out, one batched forward pass per step.

`LLMEngine` owns the model, the KV pool and every sequence. It is synchronous and single-
threaded on purpose; the server drives it from one worker thread. Each step the scheduler
picks the work (a block per decoding sequence, prefill chunks for admitted ones), and the
engine runs it as one pass: propose -> forward -> verify -> compact the KV cache -> outputs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field

import torch

from .config import SamplingParams, SpecConfig
from .cost_model import BudgetTuner, LoadTuner, StepCostModel
from .errors import ContextLengthError, EngineError, InvalidRequestError
from .kv_cache import KVPool
from .prefix_cache import PrefixCache
from .loader import LoadedModel
from .proposers.base import Draft, Proposer
from .proposers.esp import EspProposer
from .proposers.hybrid import HybridProposer
from .proposers.lade import LadeProposer
from .proposers.pld import PldProposer
from .sampling import TokenChooser, token_logprobs
from .scheduler import PrefillChunk, ScheduledStep, Scheduler, SchedulerConfig
from .sequence import Sequence, SequenceStatus
from .tree import BlockLayout, block_layout
from .verifier import Verdict, verify

log = logging.getLogger(__name__)

_MAX_SLACK = 256  # KV rows a decode block and prefill masks may add beyond the context, at most
_HYBRID_MASKS = "hybrid-masks"  # the load tuner's name for hybrid's drafts of ESP masks alone
_PROPOSERS = {"ar": None, "esp": EspProposer, "pld": PldProposer, "lade": LadeProposer, "hybrid": HybridProposer}


@dataclass(slots=True)
class StepStats:
    """What one decode pass of one sequence did (for metrics)."""

    method: str
    num_draft_tokens: int
    num_accepted_tokens: int
    num_committed: int
    block_rows: int


@dataclass(slots=True)
class RequestOutput:
    """Tokens a request committed since its previous output."""

    req_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort"
    num_prompt_tokens: int
    num_output_tokens: int
    new_logprobs: list[dict] | None = None
    step: StepStats | None = None
    stop_token_id: int | None = None  # the EOS/stop id that ended the request (not in new_token_ids)
    error: str | None = None  # set with finish_reason "error": this request failed, others go on
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache


@dataclass(slots=True)
class GenerationResult:
    output_ids: list[int]
    finish_reason: str
    num_prompt_tokens: int
    num_decode_calls: int
    num_decode_tokens: int
    wall_s: float
    logprobs: list[dict] = field(default_factory=list)

    @property
    def tau(self) -> float:
        return self.num_decode_tokens / self.num_decode_calls if self.num_decode_calls else 0.0


@dataclass(slots=True)
class _Piece:
    """One sequence's part of a pass (a decode block or a prefill chunk) as it is finished."""

    seq: Sequence
    work: "_Block | PrefillChunk"
    embeds: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor | None
    hidden: torch.Tensor | None = None
    result: object = None  # what the last stage produced for the next one
    choice_logits: torch.Tensor | None = None
    verdict: Verdict | None = None
    token: int | None = None


@dataclass(slots=True)
class _Block:
    """One sequence's share of a decode pass, between building and verification."""

    draft: Draft
    layout: BlockLayout
    embeds: torch.Tensor  # [M, hidden]
    positions: torch.Tensor  # [M]
    base: int  # cache length before the pass == the root's position
    cap: int  # rows the scheduler allowed
    warm: bool  # the proposer had fresh guesses (ESP: masks from the previous pass)


class LLMEngine:
    def __init__(self, loaded: LoadedModel, default_spec: SpecConfig | None = None,
                 scheduler_config: SchedulerConfig | None = None, max_rows_per_step: int | None = None) -> None:
        """`scheduler_config` sets batching, the KV-cache budget and load-adaptive speculation;
        `max_rows_per_step` is a shortcut for its cap on the decode rows of one pass (vLLM's
        max_num_batched_tokens for decode): as the batch grows, each sequence's draft tree
        shrinks to its share, down to plain decoding."""
        config = scheduler_config or SchedulerConfig()
        if max_rows_per_step is not None:
            config = dataclasses.replace(config, max_rows_per_step=max_rows_per_step)
        self.loaded = loaded
        self.model = loaded.model
        self.default_spec = default_spec or SpecConfig.from_preset("esp", "bc30")
        self.sequences: dict[str, Sequence] = {}
        self._step_costs: StepCostModel | None = None
        self._tuners: dict[tuple, BudgetTuner] = {}
        shape = self.model.shape
        self.kv_pool = KVPool.from_budget(self._kv_budget(config), shape.num_layers, shape.num_kv_heads,
                                          shape.head_dim, config.block_size, self.model.dtype, self.model.device)
        self.load_tuner = LoadTuner(self.step_costs()) if config.load_adaptive else None
        self._pass_rows, self._pass_speculative = 0, False  # the last forward pass, for the tuner
        self.prefix_cache = PrefixCache(self.kv_pool) if config.enable_prefix_caching else None
        self.scheduler = Scheduler(config, self.kv_pool, self._block_rows, self._slack, self._max_slots,
                                   self.load_tuner, self.prefix_cache)
        log.info("KV cache: %d blocks of %d slots (%.0f MiB)", self.kv_pool.num_blocks, config.block_size,
                 self.kv_pool.nbytes / 2**20)

    def _kv_budget(self, config: SchedulerConfig) -> int:
        """The configured budget, else enough for `max_num_seqs` full-length sequences, at most
        80% of the free memory of a GPU; on a CPU at most twice the weights (but room for one
        full-length sequence) and never over 4 GiB (vLLM's CPU default)."""
        if config.kv_cache_bytes is not None:
            return config.kv_cache_bytes
        shape = self.model.shape
        per_slot = KVPool.slot_bytes(shape.num_layers, shape.num_kv_heads, shape.head_dim, self.model.dtype)
        one_sequence = (self.loaded.max_model_len + 2 * _MAX_SLACK) * per_slot
        enough = config.max_num_seqs * one_sequence
        if self.model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.model.device)
            return min(enough, int(0.8 * free))
        # Traffic and the prefix cache end up touching every page of the pool, so on a CPU its size
        # is resident memory. A step over a pool twice the weights already reads more KV than
        # weights: more room buys little throughput, while a small model would hold gigabytes.
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return min(enough, max(2 * weights, one_sequence), 4 * 2**30)

    def step_costs(self) -> StepCostModel:
        if self._step_costs is None:
            self._step_costs = StepCostModel.measure(self.model)
        return self._step_costs

    # ---- request lifecycle -------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], sampling: SamplingParams, spec: SpecConfig | None = None,
                    req_id: str | None = None) -> str:
        """Validate and queue a request; raises `InvalidRequestError` subclasses on bad input."""
        req_id = req_id or uuid.uuid4().hex
        if req_id in self.sequences:
            raise InvalidRequestError(f"request id {req_id!r} is already in use")
        self.validate(prompt_ids, sampling)
        spec = spec or self.default_spec
        proposer = self._make_proposer(spec)
        seq = Sequence(req_id, list(prompt_ids), sampling, spec, TokenChooser(sampling), proposer)
        self.scheduler.add(seq)
        self.sequences[req_id] = seq
        return req_id

    def _make_proposer(self, spec: SpecConfig) -> Proposer:
        proposer_cls = _PROPOSERS[spec.method]
        if proposer_cls is None:
            return Proposer(self.model)
        if spec.adaptive:
            return proposer_cls(self.model, spec, self.budget_tuner(spec))
        return proposer_cls(self.model, spec)

    def budget_tuner(self, spec: SpecConfig) -> BudgetTuner:
        """One tuner per (method, budget), shared by sequences: acceptance is learnt across requests."""
        key = (spec.method, spec.esp_node_budget)
        if key not in self._tuners:
            self._tuners[key] = BudgetTuner(self.step_costs(), max_width=spec.esp_node_budget)
        return self._tuners[key]

    def validate(self, prompt_ids: list[int], sampling: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty: give at least one token")
        vocab = self.model.shape.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        limit = self.loaded.max_model_len
        if len(prompt_ids) + sampling.max_new_tokens > limit:
            raise ContextLengthError(
                f"this model's maximum context length is {limit} tokens; the prompt has {len(prompt_ids)} "
                f"and {sampling.max_new_tokens} more were requested ({len(prompt_ids) + sampling.max_new_tokens} in all)"
            )

    def abort_request(self, req_id: str) -> bool:
        """Forget a request and free its KV cache. Returns whether it existed."""
        seq = self.sequences.pop(req_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"
        return True

    def has_unfinished(self) -> bool:
        return bool(self.sequences)

    @property
    def num_running(self) -> int:
        return sum(1 for s in self.sequences.values() if s.status in (SequenceStatus.RUNNING, SequenceStatus.PREFILLING))

    @property
    def num_waiting(self) -> int:
        return sum(1 for s in self.sequences.values() if s.status is SequenceStatus.WAITING)

    def kv_cache_bytes(self) -> int:
        """Bytes of KV cache held by live sequences (the pool itself is preallocated)."""
        return sum(s.cache.nbytes for s in self.sequences.values() if s.cache is not None)

    def kv_cache_usage(self) -> float:
        """Fraction (0..1) of the KV pool's blocks held by live sequences (prefix-cache entries
        count as free, as in vLLM: any of them is evicted the moment a request needs room)."""
        cached = self.prefix_cache.num_blocks if self.prefix_cache is not None else 0
        return self.kv_pool.usage() - cached / self.kv_pool.num_blocks

    # ---- sizes the scheduler asks for ----------------------------------------------------
    @staticmethod
    def _block_rows(seq: Sequence) -> int:
        return seq.spec.block_complexity if seq.spec.method != "ar" else 1

    def _slack(self, seq: Sequence) -> int:
        return seq.proposer.num_prefill_masks + self._block_rows(seq) + 1

    def _max_slots(self, seq: Sequence) -> int:
        longest = min(len(seq.prompt_ids) + seq.sampling.max_new_tokens, self.loaded.max_model_len)
        return longest + self._slack(seq)

    # ---- stepping ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass: a block for every decoding sequence (root, draft tree, masks or
        lookahead rows, each with its own positions and tree mask) plus prefill chunks of
        admitted requests, as far as the step's token budget allows."""
        start = time.perf_counter()
        plan = self.scheduler.schedule()
        outputs = self._run(plan) if not plan.is_empty else []
        if self.load_tuner is not None and plan.share is not None and plan.decode and not plan.prefill:
            # Decode-only passes teach the tuner how far its cost model is off (prefill chunks
            # would blur it: their attention grows with the prompt).
            committed = sum(out.step.num_committed for out in outputs if out.step is not None)
            self.load_tuner.observe_pass(len(plan.decode), self._pass_rows, self._pass_speculative,
                                         time.perf_counter() - start, committed)
        for out in outputs:
            if out.finished:
                seq = self.sequences.pop(out.req_id, None)
                if seq is not None:
                    self.scheduler.remove(seq)
        return outputs

    def generate(self, prompt_ids: list[int], sampling: SamplingParams, spec: SpecConfig | None = None) -> GenerationResult:
        """Run one request to completion (benchmarks, tests, the CLI); other requests in the
        engine advance alongside."""
        start = time.perf_counter()
        req_id = self.add_request(prompt_ids, sampling, spec)
        seq = self.sequences[req_id]
        output_ids: list[int] = []
        logprobs: list[dict] = []
        while True:
            mine = [o for o in self.step() if o.req_id == req_id]
            if not mine:
                continue
            out = mine[0]
            if out.error is not None:
                raise EngineError(f"generation failed: {out.error}")
            output_ids.extend(out.new_token_ids)
            logprobs.extend(out.new_logprobs or [])
            if out.finished:
                break
        return GenerationResult(output_ids, out.finish_reason or "stop", len(prompt_ids), seq.stats.num_decode_calls,
                                seq.stats.num_decode_tokens, time.perf_counter() - start, logprobs)

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        log.error("request %s failed", seq.req_id, exc_info=exc)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "error"
        return RequestOutput(seq.req_id, [], True, "error", len(seq.prompt_ids), len(seq.output_ids),
                             error=f"{type(exc).__name__}: {exc}")

    @torch.inference_mode()
    def _run(self, plan: ScheduledStep) -> list[RequestOutput]:
        """Build every piece of the pass, run it once, then verify or finish each piece.

        The LM head (a sixth of SmolLM2's weights) is read twice per step whatever the batch:
        once for every row that chooses a token, once for every row a proposer reads back.
        A request whose own work fails ends alone; a failing forward pass ends them all."""
        outputs: list[RequestOutput] = []
        pieces: list[_Piece] = []
        for seq, cap in plan.decode:
            try:
                block = self._build_block(seq, cap)
                pieces.append(_Piece(seq, block, block.embeds, block.positions,
                                     block.layout.attn if block.layout.num_rows > 1 else None))
            except Exception as exc:
                outputs.append(self._fail(seq, exc))
        for chunk in plan.prefill:
            try:
                embeds, positions = self._build_prefill(chunk)
                pieces.append(_Piece(chunk.seq, chunk, embeds, positions, None))
            except Exception as exc:
                outputs.append(self._fail(chunk.seq, exc))
        if not pieces:
            return outputs
        rows = [p.embeds.shape[0] for p in pieces]
        self._pass_rows = sum(rows)
        self._pass_speculative = any(n > 1 for p, n in zip(pieces, rows) if isinstance(p.work, _Block))
        try:
            hidden = self.model.forward_batch([p.seq.cache for p in pieces], torch.cat([p.embeds for p in pieces]),
                                              torch.cat([p.positions for p in pieces]), [p.mask for p in pieces], rows)
        except Exception as exc:
            return outputs + [self._fail(p.seq, exc) for p in pieces]
        for piece, part in zip(pieces, hidden.split(rows)):
            piece.hidden = part
        live = self._each(pieces, outputs, lambda p: p.hidden[self._choosing_rows(p)])
        for piece, logits in zip(live, self._batched_logits([p.result for p in live])):
            piece.result = logits
        live = self._each(live, outputs, self._verify)
        for piece, logits in zip(live, self._batched_logits([p.result for p in live])):
            piece.result = logits
        for piece in self._each(live, outputs, lambda p: self._complete(p, plan.share)):
            if piece.result is not None:
                outputs.append(piece.result)
        return outputs

    def _each(self, pieces: list["_Piece"], outputs: list[RequestOutput], run) -> list["_Piece"]:
        """`piece.result = run(piece)` for each piece; those that raise end (into `outputs`)."""
        kept = []
        for piece in pieces:
            try:
                piece.result = run(piece)
                kept.append(piece)
            except Exception as exc:
                outputs.append(self._fail(piece.seq, exc))
        return kept

    def _batched_logits(self, groups: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        sizes = [0 if g is None else g.shape[0] for g in groups]
        if not sum(sizes):
            return [None] * len(groups)
        logits = self.model.logits(torch.cat([g for g in groups if g is not None and g.shape[0]]))
        parts = iter(logits.split([n for n in sizes if n]))
        return [next(parts) if n else None for n in sizes]

    @staticmethod
    def _choosing_rows(piece: "_Piece") -> slice:
        """Rows whose logits choose tokens: a block's tree rows, a finished prompt's last row."""
        work = piece.work
        if isinstance(work, _Block):
            return slice(0, work.layout.num_tree_rows)
        if work.is_last and not piece.seq.output_ids:
            n = work.end - work.start
            return slice(n - 1, n)
        return slice(0, 0)

    def _verify(self, piece: "_Piece") -> torch.Tensor | None:
        """Choose tokens from the first logits; return the rows the proposer reads back."""
        seq, work, logits = piece.seq, piece.work, piece.result
        piece.choice_logits = logits
        if isinstance(work, _Block):
            piece.verdict = verify(work.draft.tree, logits, seq.chooser)
            seq.cache.compact(work.base, [work.base] + [work.base + r for r in piece.verdict.accepted_rows])
            rows = seq.proposer.readout_rows(work.draft, work.layout, piece.verdict)
            return None if rows is None else piece.hidden[rows]
        if logits is None:
            return None  # a prefill chunk that chooses nothing
        n = work.end - work.start
        seq.cache.truncate(work.end)  # drop the masks' KV
        piece.token = seq.chooser.choose(logits[0])
        return piece.hidden[n:]  # the prefill masks (ESP), if any

    def _complete(self, piece: "_Piece", share: int | None) -> RequestOutput | None:
        if isinstance(piece.work, _Block):
            return self._finish_block(piece, share)
        return self._finish_prefill(piece)

    def _build_prefill(self, chunk: PrefillChunk) -> tuple[torch.Tensor, torch.Tensor]:
        seq, model = chunk.seq, self.model
        fresh = not seq.output_ids
        embeds = model.embed(torch.tensor(seq.prefill_ids[chunk.start : chunk.end], device=model.device))
        if fresh and chunk.start == seq.num_cached_tokens:  # the first chunk
            whole = embeds if chunk.is_last and chunk.start == 0 else model.embed(torch.tensor(seq.prompt_ids, device=model.device))
            seq.proposer.begin(seq.prompt_ids, whole)
        k = seq.proposer.num_prefill_masks if fresh and chunk.is_last else 0
        if k:
            embeds = torch.cat([embeds, seq.proposer.mask_embedding().expand(k, -1)], dim=0)
        positions = torch.arange(chunk.start, chunk.end + k, device=model.device).clamp_(max=model.shape.max_position - 1)
        return embeds, positions

    def _finish_prefill(self, piece: "_Piece") -> RequestOutput | None:
        seq, chunk = piece.seq, piece.work
        if not chunk.is_last:
            return None
        seq.status = SequenceStatus.RUNNING
        if seq.output_ids:  # recomputed after a preemption: the next step decodes from here
            return None
        if self.prefix_cache is not None:
            self.prefix_cache.store(seq.prompt_ids, seq.cache)
        seq.proposer.on_prefill(piece.result)
        seq.stats.first_token_time = time.monotonic()
        return self._commit(seq, [piece.token], piece.choice_logits, step=None)

    def _build_block(self, seq: Sequence, cap: int) -> "_Block":
        model = self.model
        context = seq.context
        base = seq.cache.length  # == position of the root
        max_nodes, extras = self._fit(seq, cap, context)
        warm = seq.proposer.has_guesses
        draft = seq.proposer.propose(context, max_nodes=max_nodes, extras=extras)
        tree = draft.tree
        layout = block_layout(tuple(tree.parents), draft.num_masks, draft.lookahead_shape)
        ids = [context[-1], *tree.tokens]
        if draft.num_masks:
            ids += [0] * (layout.num_tree_rows * draft.num_masks)
        ids += draft.lookahead_tokens
        embeds = model.embed(torch.tensor(ids, device=model.device))
        if draft.num_masks:
            embeds[layout.mask_rows] = draft.mask_embedding
        positions = (layout.offsets + base).clamp_(max=model.shape.max_position - 1)
        return _Block(draft, layout, embeds, positions, base, cap, warm)

    def _fit(self, seq: Sequence, cap: int, context: list[int]) -> tuple[int, bool]:
        """Most draft nodes, and whether mask/lookahead rows fit, in a block of `cap` rows."""
        spec = seq.spec
        max_nodes = max(0, seq.remaining - 1)
        if cap >= self._block_rows(seq):
            return max_nodes, True
        if cap <= 1:  # plain decoding this pass: no draft, no search for one (a full batch pays it per sequence)
            return 0, False
        if spec.method == "hybrid" and seq.proposer.chains(context):
            # Short of room, a copied chain is worth its rows far more often than mask guesses,
            # which would also double every row: the chain takes the whole share, without masks.
            return min(max_nodes, cap - 1), False
        if spec.method in ("esp", "hybrid"):
            per_row = spec.num_masks + 1
            # Room for the root's masks and at least one masked node; hybrid without a chain spends
            # rows on masks only where they were seen to pay (on a CPU they rarely do).
            if cap >= 2 * per_row and (spec.method == "esp" or self._masks_pay(cap)):
                return min(max_nodes, cap // per_row - 1), True
        if spec.method == "lade":
            window = (spec.lade_level - 1) * spec.lade_window
            if cap > window + 1:
                return min(max_nodes, cap - 1 - window), True
        return min(max_nodes, cap - 1), False

    def _masks_pay(self, cap: int) -> bool:
        tuner = self.load_tuner
        return tuner is None or tuner.pays_alone(_HYBRID_MASKS, cap)

    def _finish_block(self, piece: "_Piece", share: int | None) -> RequestOutput:
        """The proposer learns from the pass; the accepted tokens are committed."""
        seq, block, verdict, tree_logits = piece.seq, piece.work, piece.verdict, piece.choice_logits
        draft, layout = block.draft, block.layout
        tree = draft.tree
        seq.proposer.observe(draft, layout, piece.result, verdict)
        stats = seq.stats
        stats.num_decode_calls += 1
        stats.num_draft_tokens += tree.num_nodes
        stats.num_accepted_tokens += verdict.num_accepted
        stats.block_rows += layout.num_rows
        for depth in range(1, verdict.num_accepted + 1):
            if len(stats.accepted_per_position) < depth:
                stats.accepted_per_position.append(0)
            stats.accepted_per_position[depth - 1] += 1
        rows = [0, *verdict.accepted_rows]
        step = StepStats(seq.spec.method, tree.num_nodes, verdict.num_accepted, 0, layout.num_rows)
        out = self._commit(seq, verdict.committed, tree_logits[rows] if seq.sampling.logprobs is not None else None, step)
        stats.num_decode_tokens += step.num_committed
        if share is not None and self.load_tuner is not None and block.warm:
            self.load_tuner.record(seq.spec.method, block.cap, step.num_committed, layout.num_rows)
            if seq.spec.method == "hybrid" and draft.num_masks and block.cap < self._block_rows(seq):
                # Hybrid's mask-only drafts under a cap, learnt apart: whether they pay decides
                # whether the next ones are drafted at all (`_fit`).
                self.load_tuner.record(_HYBRID_MASKS, block.cap, step.num_committed, layout.num_rows)
        return out

    def _commit(self, seq: Sequence, tokens: list[int], logits: torch.Tensor | None, step: StepStats | None) -> RequestOutput:
        """Append tokens one by one, honouring EOS, stop ids and max_new_tokens inside the run.

        Tokens after a stop are discarded with their KV (the sequence ends) and usage."""
        sampling = seq.sampling
        stop_ids = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop_ids.update(self.loaded.eos_token_ids)
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
        num_counted = len(kept) + (stop_token is not None)
        if step is not None:
            step.num_committed = num_counted
        seq.output_ids.extend(kept)
        seq.proposer.on_commit(kept)
        logprobs = None
        if sampling.logprobs is not None and logits is not None and kept:
            logprobs = token_logprobs(logits[: len(kept)], kept, sampling.logprobs)
        finished = seq.finish_reason is not None
        if finished:  # `step` gives the KV blocks back
            seq.status = SequenceStatus.FINISHED
            seq.stats.finish_time = time.monotonic()
        return RequestOutput(seq.req_id, kept, finished, seq.finish_reason, len(seq.prompt_ids),
                             len(seq.output_ids), logprobs, step, stop_token, num_cached_tokens=seq.num_cached_tokens)
