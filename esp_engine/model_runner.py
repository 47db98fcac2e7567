"""One scheduled step in, plain results out: the only code that touches tensors and the device.

`ModelRunner.execute(plan)` drafts each decoding sequence's block, lays every block and prefill
chunk of the step out as rows of one forward pass, runs it, applies the LM head once to every
row that chooses a token, verifies each block, compacts the KV cache to the accepted path, and
applies the LM head once more to the rows proposers read back. What it returns is per sequence:
the tokens the model chose, their log-probabilities if asked, and the proposer's readout. It
never decides admission, stopping or finishing: that is the scheduler's `update`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cost_model import StepCostModel
from .kv_cache import KVCache, compact_caches
from .model import LlamaFamilyModel
from .proposers.base import Draft, ReadoutCandidates
from .sampling import token_logprobs
from .scheduler import DecodeSlot, PrefillChunk, StepPlan
from .sequence import Sequence
from .tree import BlockLayout, block_layout
from .verifier import Verdict, verify

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DecodeOutcome:
    """A decode block as drafted and verified."""

    draft: Draft
    layout: BlockLayout
    verdict: Verdict
    max_rows: int  # rows the scheduler allowed


@dataclass(slots=True)
class SequenceResult:
    """One sequence's part of a step."""

    req_id: str
    token_ids: list[int] = field(default_factory=list)  # chosen by the model, in order (accepted nodes, then the bonus)
    logprobs: list[dict] | None = None  # one entry per token of `token_ids`, when the request asked for them
    readout: torch.Tensor | None = None  # logits of the proposer's readout rows (ESP masks, a LADE window)
    decode: DecodeOutcome | None = None  # None for a prefill chunk
    prefill_done: bool = False  # a prefill chunk that completed the sequence's prefill
    # Prefill chunks of a request that asked: log-probabilities of prompt tokens start+1, start+2, ...
    prompt_logprobs: list[dict] | None = None
    prompt_start: int = 0  # the chunk's first position
    error: Exception | None = None  # this sequence's work failed; the others' did not


@dataclass(slots=True)
class StepResult:
    sequences: list[SequenceResult]
    num_rows: int  # rows of the forward pass
    is_speculative: bool  # some decode block carried more than its root


@dataclass(slots=True)
class _Piece:
    """One sequence's rows in the pass, and what each stage found out about them."""

    seq: Sequence
    result: SequenceResult
    embeds: torch.Tensor  # [M, hidden]
    positions: torch.Tensor  # [M]
    attn: torch.Tensor | None  # [M, M] tree mask; None: causal
    choosing: slice  # rows whose logits choose tokens
    block: tuple[Draft, BlockLayout, int, int] | None = None  # draft, layout, base, max_rows (decode only)
    hidden: torch.Tensor | None = None
    choice_logits: torch.Tensor | None = None
    greedy_choices: list[int] | None = None  # argmax of the rows a greedy sequence chooses with
    early: ReadoutCandidates | None = None  # rows the readout will be taken from, known before choosing
    early_logits: torch.Tensor | None = None  # their logits, where they rode with the choosing rows'
    readout_rows: slice | None = None


class ModelRunner:
    def __init__(self, model: LlamaFamilyModel, step_costs: Callable[[], StepCostModel] | None = None) -> None:
        """`step_costs` (measured on first call) says when a readout's candidate rows should
        ride with the choosing rows through the LM head; without it they never do where that
        adds rows."""
        self.model = model
        self.step_costs = step_costs

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        """Run `plan` as one forward pass. A sequence whose own work fails is reported with its
        error and the others go on; a failing forward pass fails every sequence in it."""
        pieces: list[_Piece] = []
        failed: list[SequenceResult] = []
        for slot in plan.decode:
            self._build(pieces, failed, slot.seq, lambda: self._decode_piece(slot))
        for chunk in plan.prefill:
            self._build(pieces, failed, chunk.seq, lambda: self._prefill_piece(chunk))
        rows = [p.embeds.shape[0] for p in pieces]
        speculative = any(p.block is not None and n > 1 for p, n in zip(pieces, rows))
        if pieces:
            try:
                hidden = self._forward(pieces, rows)
            except Exception as exc:
                log.error("forward pass failed", exc_info=exc)
                for p in pieces:
                    p.result.error = exc
            else:
                for piece, part in zip(pieces, hidden.split(rows)):
                    piece.hidden = part
                self._finish(pieces)
        return StepResult(failed + [p.result for p in pieces], sum(rows), speculative)

    def _forward(self, pieces: list[_Piece], rows: list[int]) -> torch.Tensor:
        """Hidden states of every piece's rows, one piece after another (`PaddedModelRunner`
        runs them in static buckets instead)."""
        return self.model.forward_batch([p.seq.cache for p in pieces], torch.cat([p.embeds for p in pieces]),
                                        torch.cat([p.positions for p in pieces]), [p.attn for p in pieces], rows)

    @staticmethod
    def _build(pieces: list[_Piece], failed: list[SequenceResult], seq: Sequence, build) -> None:
        try:
            pieces.append(build())
        except Exception as exc:
            failed.append(SequenceResult(seq.req_id, error=exc))

    # ---- inputs -------------------------------------------------------------------------------
    def _decode_piece(self, slot: DecodeSlot) -> _Piece:
        seq, model = slot.seq, self.model
        context = seq.context
        base = seq.cache.length  # == position of the root
        draft = seq.proposer.draft(context, slot.budget)
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
        return _Piece(seq, SequenceResult(seq.req_id), embeds, positions,
                      layout.attn if layout.num_rows > 1 else None, slice(0, layout.num_tree_rows),
                      block=(draft, layout, base, slot.budget.max_rows),
                      early=seq.proposer.readout_candidates(draft, layout))

    def _prefill_piece(self, chunk: PrefillChunk) -> _Piece:
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
        n = chunk.end - chunk.start
        # A prompt's last row chooses the first output token; a recomputation after preemption
        # chooses nothing (its next token is already committed). Scoring the prompt reads every row.
        if fresh and seq.sampling.prompt_logprobs is not None:
            choosing = slice(0, n)
        else:
            choosing = slice(n - 1, n) if chunk.is_last and fresh else slice(0, 0)
        result = SequenceResult(seq.req_id, prefill_done=chunk.is_last, prompt_start=chunk.start)
        early = ReadoutCandidates.whole(slice(n, n + k)) if k else None  # the prefill masks
        return _Piece(seq, result, embeds, positions, None, choosing, early=early)

    # ---- outputs ------------------------------------------------------------------------------
    def _finish(self, pieces: list[_Piece]) -> None:
        """Choose, verify and read back: the LM head runs once or twice for the whole batch (see
        `_early_readouts`), and the greedy choices and KV moves of all sequences take one device
        transfer each."""
        live = [p for p in pieces if p.choosing.stop > p.choosing.start]
        early = self._early_readouts(live)
        groups = [torch.cat([p.hidden[p.choosing], p.hidden[p.early.rows]]) if id(p) in early else p.hidden[p.choosing]
                  for p in live]
        for piece, logits in zip(live, self._logits(groups)):
            chosen = piece.choosing.stop - piece.choosing.start
            piece.choice_logits = logits[:chosen]
            if id(piece) in early:
                piece.early_logits = logits[chosen:]
        self._greedy_choices(live)
        moves = {i: move for i, piece in enumerate(pieces) if (move := self._guard(piece, self._choose)) is not None}
        try:
            compact_caches(list(moves.values()))
        except Exception as exc:
            for i in moves:
                pieces[i].result.error = exc
        late = []
        for piece in pieces:
            rows = piece.readout_rows
            if rows is None or piece.result.error is not None:
                continue
            if piece.early_logits is not None:
                start = rows.start - piece.early.rows.start
                piece.result.readout = piece.early_logits[start : start + rows.stop - rows.start]
            else:
                late.append(piece)
        for piece, logits in zip(late, self._logits([p.hidden[p.readout_rows] for p in late])):
            piece.result.readout = logits

    def _early_readouts(self, live: list[_Piece]) -> set[int]:
        """Pieces whose readout candidates go through the LM head with the choosing rows. Where a
        piece reads all its candidates (the prefill masks, a lookahead window), always: one call
        instead of two over the same rows. Where it reads a few of many (ESP: the masks of the
        deepest accepted row, one owner among all), only if the measured head cost says the
        one larger call is cheaper than a second call."""
        sure = [p for p in live if p.early is not None and p.early.read_in_full]
        maybe = [p for p in live if p.early is not None and not p.early.read_in_full]
        if maybe and self.step_costs is not None:
            choosing = sum(p.choosing.stop - p.choosing.start for p in live) + sum(p.early.taken for p in sure)
            extra = sum(p.early.count for p in maybe)
            if self.step_costs().one_head_call_pays(choosing, extra, sum(p.early.taken for p in maybe)):
                sure += maybe
        return {id(p) for p in sure}

    @staticmethod
    def _guard(piece: _Piece, stage):
        """`stage(piece)`'s result; None, with the error on the piece's result, if it fails."""
        try:
            return stage(piece)
        except Exception as exc:
            piece.result.error = exc
            return None

    @staticmethod
    def _greedy_choices(live: list[_Piece]) -> None:
        """Argmax of every row a greedy sequence chooses with (a block's tree rows, a finished
        prompt's last row), in one op and one copy to the host for the whole batch."""
        chosen = [(p, p.choice_logits if p.block is not None else p.choice_logits[-1:]) for p in live
                  if p.seq.chooser.is_greedy and (p.block is not None or p.result.prefill_done)]
        if not chosen:
            return
        choices = torch.cat([rows for _, rows in chosen]).argmax(dim=-1).tolist()
        start = 0
        for piece, rows in chosen:
            piece.greedy_choices = choices[start : start + rows.shape[0]]
            start += rows.shape[0]

    def _choose(self, piece: _Piece) -> tuple[KVCache, int, list[int]] | None:
        """Tokens from the choosing rows. The KV cache keeps what plain decoding would have: a
        block returns the move of its accepted path (cache, base, kept slots), which `_finish`
        makes for the whole batch at once."""
        seq, result = piece.seq, piece.result
        if piece.block is not None:
            draft, layout, base, max_rows = piece.block
            verdict = verify(draft.tree, piece.choice_logits, seq.chooser, piece.greedy_choices)
            result.decode = DecodeOutcome(draft, layout, verdict, max_rows)
            result.token_ids = verdict.committed
            piece.readout_rows = seq.proposer.readout_rows(draft, layout, verdict)
            if seq.sampling.logprobs is not None:
                result.logprobs = token_logprobs(piece.choice_logits[[0, *verdict.accepted_rows]], verdict.committed,
                                                 seq.sampling.logprobs)
            return seq.cache, base, [base] + [base + r for r in verdict.accepted_rows]
        if piece.choice_logits is None:
            return None  # a prefill chunk that chooses nothing
        logits = piece.choice_logits
        start, n = result.prompt_start, piece.choosing.stop
        if seq.sampling.prompt_logprobs is not None:  # row i predicts prompt token start+i+1
            targets = seq.prompt_ids[start + 1 : start + n + 1]
            result.prompt_logprobs = token_logprobs(logits[: len(targets)], targets, seq.sampling.prompt_logprobs,
                                                    with_rank=True)
        if not result.prefill_done:
            return None
        seq.cache.truncate(seq.cache.length - (piece.embeds.shape[0] - n))  # drop the masks' KV
        result.token_ids = piece.greedy_choices or [seq.chooser.choose(logits[-1])]
        piece.readout_rows = slice(n, piece.hidden.shape[0])  # the prefill masks (ESP), if any
        if seq.sampling.logprobs is not None:
            result.logprobs = token_logprobs(logits[-1:], result.token_ids, seq.sampling.logprobs)
        return None

    def _logits(self, groups: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The LM head over every group's rows at once, split back per group (None where empty)."""
        sizes = [g.shape[0] for g in groups]
        if not sum(sizes):
            return [None] * len(groups)
        logits = self.model.logits(torch.cat([g for g in groups if g.shape[0]]))
        parts = iter(logits.split([n for n in sizes if n]))
        return [next(parts) if n else None for n in sizes]
