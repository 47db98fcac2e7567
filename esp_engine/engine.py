"""The engine: requests in, committed tokens out, one forward pass per sequence step.

`LLMEngine` owns the model and every sequence's KV cache. It is synchronous and single-
threaded on purpose; the server drives it from one worker thread. A step prefills waiting
requests, then advances every running sequence by one speculative pass:
propose -> forward the block -> verify -> compact the KV cache -> stream deltas.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

import torch

from .config import SamplingParams, SpecConfig
from .cost_model import BudgetTuner, StepCostModel
from .errors import ContextLengthError, EngineError, InvalidRequestError
from .kv_cache import KVCache
from .loader import LoadedModel
from .proposers.base import Draft, Proposer
from .proposers.esp import EspProposer
from .proposers.hybrid import HybridProposer
from .proposers.lade import LadeProposer
from .proposers.pld import PldProposer
from .sampling import TokenChooser, token_logprobs
from .sequence import Sequence, SequenceStatus
from .tree import BlockLayout, block_layout
from .verifier import Verdict, verify

log = logging.getLogger(__name__)

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
class _Block:
    """One sequence's share of a decode pass, between building and verification."""

    draft: Draft
    layout: BlockLayout
    embeds: torch.Tensor  # [M, hidden]
    positions: torch.Tensor  # [M]
    base: int  # cache length before the pass == the root's position


class LLMEngine:
    def __init__(self, loaded: LoadedModel, default_spec: SpecConfig | None = None,
                 max_rows_per_step: int | None = None) -> None:
        """`max_rows_per_step` caps the rows of one batched pass (vLLM's max_num_batched_tokens
        for decode): as the batch grows, each sequence's draft tree shrinks to its share, down to
        plain decoding, so speculation never multiplies the cost of a loaded step."""
        if max_rows_per_step is not None and max_rows_per_step < 1:
            raise InvalidRequestError("max_rows_per_step must be at least 1")
        self.max_rows_per_step = max_rows_per_step
        self.loaded = loaded
        self.model = loaded.model
        self.default_spec = default_spec or SpecConfig.from_preset("esp", "bc30")
        self.sequences: dict[str, Sequence] = {}
        shape = self.model.shape
        self._kv_args = (shape.num_layers, shape.num_kv_heads, shape.head_dim)
        self._step_costs: StepCostModel | None = None
        self._tuners: dict[tuple, BudgetTuner] = {}

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
        self.sequences[req_id] = Sequence(req_id, list(prompt_ids), sampling, spec, TokenChooser(sampling), proposer)
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
            if self._step_costs is None:
                self._step_costs = StepCostModel.measure(self.model)
            self._tuners[key] = BudgetTuner(self._step_costs, max_width=spec.esp_node_budget)
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
        seq.cache = None
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"
        return True

    def has_unfinished(self) -> bool:
        return bool(self.sequences)

    @property
    def num_running(self) -> int:
        return sum(1 for s in self.sequences.values() if s.status is SequenceStatus.RUNNING)

    @property
    def num_waiting(self) -> int:
        return sum(1 for s in self.sequences.values() if s.status is SequenceStatus.WAITING)

    def kv_cache_bytes(self) -> int:
        return sum(s.cache.nbytes for s in self.sequences.values() if s.cache is not None)

    def kv_cache_usage(self) -> float:
        """Fraction (0..1) of the KV-cache pool held by live sequences."""
        capacity = self.loaded.max_model_len * 64  # replaced by the block pool's size
        used = sum(s.cache.capacity for s in self.sequences.values() if s.cache is not None)
        return min(1.0, used / capacity)

    def step(self) -> list[RequestOutput]:
        """Prefill one waiting request if any, else advance every running sequence by one pass.

        All running sequences share that one forward pass: each contributes its own block
        (root, draft tree, masks or lookahead rows), with its own positions and tree mask."""
        outputs: list[RequestOutput] = []
        waiting = [s for s in self.sequences.values() if s.status is SequenceStatus.WAITING]
        if waiting:
            outputs.append(self._guarded(self._prefill, waiting[0]))
        elif self.sequences:
            outputs.extend(self._decode_batch(list(self.sequences.values())))
        for out in outputs:
            if out.finished:
                self.sequences.pop(out.req_id, None)
        return outputs

    def _guarded(self, run, seq: Sequence, *args) -> RequestOutput:
        """Run one sequence's work; a failure ends that request alone, with its KV freed."""
        try:
            return run(seq, *args)
        except Exception as exc:
            return self._fail(seq, exc)

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        log.error("request %s failed", seq.req_id, exc_info=exc)
        seq.cache = None
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "error"
        return RequestOutput(seq.req_id, [], True, "error", len(seq.prompt_ids), len(seq.output_ids),
                             error=f"{type(exc).__name__}: {exc}")

    def generate(self, prompt_ids: list[int], sampling: SamplingParams, spec: SpecConfig | None = None) -> GenerationResult:
        """Run one request to completion on its own (benchmarks, tests, the CLI)."""
        start = time.perf_counter()
        req_id = self.add_request(prompt_ids, sampling, spec)
        seq = self.sequences[req_id]
        output_ids: list[int] = []
        logprobs: list[dict] = []
        out = self._prefill(seq)
        while True:
            if out.error is not None:
                raise EngineError(f"generation failed: {out.error}")
            output_ids.extend(out.new_token_ids)
            logprobs.extend(out.new_logprobs or [])
            if out.finished:
                break
            out = self._decode(seq)
        self.sequences.pop(req_id, None)
        return GenerationResult(output_ids, out.finish_reason or "stop", len(prompt_ids), seq.stats.num_decode_calls,
                                seq.stats.num_decode_tokens, time.perf_counter() - start, logprobs)

    # ---- passes --------------------------------------------------------------------------
    @torch.inference_mode()
    def _prefill(self, seq: Sequence) -> RequestOutput:
        model = self.model
        prompt = torch.tensor(seq.prompt_ids, device=model.device)
        k = seq.proposer.num_prefill_masks
        slack = self._max_block_rows(seq.spec) + k
        longest = min(len(seq.prompt_ids) + seq.sampling.max_new_tokens, self.loaded.max_model_len) + slack
        seq.cache = KVCache(*self._kv_args, capacity=min(longest, len(seq.prompt_ids) + KVCache.GROWTH_CHUNK + slack),
                            dtype=model.dtype, device=model.device, max_capacity=longest)
        embeds = model.embed(prompt)
        seq.proposer.begin(seq.prompt_ids, embeds)
        if k:
            embeds = torch.cat([embeds, seq.proposer.mask_embedding().expand(k, -1)], dim=0)
        positions = torch.arange(embeds.shape[0], device=model.device).clamp_(max=model.shape.max_position - 1)
        hidden = model(seq.cache, embeds, positions, None)
        num_prompt = len(seq.prompt_ids)
        seq.cache.truncate(num_prompt)  # drop the masks' KV
        last = model.logits(hidden[num_prompt - 1 : num_prompt])
        token = seq.chooser.choose(last[0])
        seq.proposer.on_prefill(hidden[num_prompt:] if k else None)
        seq.status = SequenceStatus.RUNNING
        seq.stats.first_token_time = time.monotonic()
        return self._commit(seq, [token], last, step=None)

    def _decode(self, seq: Sequence) -> RequestOutput:
        return self._decode_batch([seq])[0]

    @torch.inference_mode()
    def _decode_batch(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """One forward pass over the blocks of `seqs`; a request whose proposer or
        verification fails ends alone, a failing forward pass ends them all."""
        outputs: dict[str, RequestOutput] = {}
        blocks: list[tuple[Sequence, _Block]] = []
        row_share = self.max_rows_per_step // len(seqs) if self.max_rows_per_step else None
        for seq in seqs:
            try:
                blocks.append((seq, self._build_block(seq, row_share)))
            except Exception as exc:
                outputs[seq.req_id] = self._fail(seq, exc)
        if blocks:
            try:
                hidden = self.model.forward_batch(
                    [seq.cache for seq, _ in blocks],
                    torch.cat([b.embeds for _, b in blocks]),
                    torch.cat([b.positions for _, b in blocks]),
                    [b.layout.attn if b.layout.num_rows > 1 else None for _, b in blocks],
                    [b.layout.num_rows for _, b in blocks],
                )
            except Exception as exc:
                for seq, _ in blocks:
                    outputs[seq.req_id] = self._fail(seq, exc)
                return [outputs[s.req_id] for s in seqs]
            row = 0
            for seq, block in blocks:
                rows = block.layout.num_rows
                outputs[seq.req_id] = self._guarded(self._finish_block, seq, block, hidden[row : row + rows])
                row += rows
        return [outputs[s.req_id] for s in seqs]

    def _build_block(self, seq: Sequence, row_share: int | None = None) -> "_Block":
        model = self.model
        context = seq.context
        base = seq.cache.length  # == position of the root
        max_nodes = max(0, seq.remaining - 1)
        if row_share is not None:  # every tree row brings its k mask rows along
            rows_per_node = seq.spec.num_masks + 1 if seq.spec.method in ("esp", "hybrid") else 1
            max_nodes = min(max_nodes, max(0, row_share // rows_per_node - 1))
        draft = seq.proposer.propose(context, max_nodes=max_nodes)
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
        return _Block(draft, layout, embeds, positions, base)

    def _finish_block(self, seq: Sequence, block: "_Block", hidden: torch.Tensor) -> RequestOutput:
        """Verify, keep the accepted path's KV, update the proposer, commit."""
        draft, layout, base = block.draft, block.layout, block.base
        tree = draft.tree
        tree_logits = self.model.logits(hidden[: layout.num_tree_rows])
        verdict = verify(tree, tree_logits, seq.chooser)
        seq.cache.compact(base, [base] + [base + r for r in verdict.accepted_rows])
        seq.proposer.observe(draft, layout, hidden, verdict)
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
        if finished:
            seq.status = SequenceStatus.FINISHED
            seq.stats.finish_time = time.monotonic()
            seq.cache = None
        return RequestOutput(seq.req_id, kept, finished, seq.finish_reason, len(seq.prompt_ids),
                             len(seq.output_ids), logprobs, step, stop_token)

    @staticmethod
    def _max_block_rows(spec: SpecConfig) -> int:
        if spec.method == "lade":
            return spec.block_complexity + spec.lade_guess * (spec.lade_level - 1)
        if spec.method == "pld":
            return spec.block_complexity
        return spec.block_complexity + spec.num_masks + 1
