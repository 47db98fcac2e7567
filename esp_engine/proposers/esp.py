"""ESP: mask vectors from the model's own embedding space guess the next tokens.

State per sequence (docs/ESP.md): the mask embedding `m` (mean of the prompt's embeddings,
then `m += lam * (E[t] - m)` per committed token) and the k mask distributions from the
previous pass, read off the masks owned by the deepest accepted row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config import SpecConfig
from ..tree import BlockLayout, DraftTree
from ..verifier import Verdict
from .base import Draft, DraftBudget, Proposer, ReadoutCandidates

if TYPE_CHECKING:
    from ..cost_model import BudgetTuner


@dataclass(frozen=True, slots=True)
class Candidate:
    depth: int  # 1-based
    token: int
    score: float  # log of the product of probabilities along the path
    parent: int  # index of the parent candidate, -1 for the root


def expand_top1(mask_logprobs: torch.Tensor, root: int, widths: list[int]) -> list[Candidate]:
    """Top-1 expansion: depth i takes the `widths[i-1]` best tokens of mask i, all children of
    the best node of depth i-1. A token equal to its parent's is pruned and the next-best one
    fills its place. Returned by depth, best first within a depth."""
    candidates: list[Candidate] = []
    parent_index, parent_token, parent_score = -1, root, 0.0
    for depth, width in enumerate(widths, start=1):
        if width <= 0 or depth > mask_logprobs.shape[0]:
            break
        values, ids = torch.topk(mask_logprobs[depth - 1], width + 1)
        first_index = len(candidates)
        taken = 0
        for value, token in zip(values.tolist(), ids.tolist()):
            if token == parent_token:
                continue
            candidates.append(Candidate(depth, token, parent_score + value, parent_index))
            taken += 1
            if taken == width:
                break
        best = candidates[first_index]
        parent_index, parent_token, parent_score = first_index, best.token, best.score
    return candidates


def static_tree_candidates(mask_logprobs: torch.Tensor, root: int, widths: tuple[int, ...]) -> list[Candidate]:
    return expand_top1(mask_logprobs, root, list(widths))


def dynamic_tree_candidates(mask_logprobs: torch.Tensor, root: int, budget: int) -> list[Candidate]:
    """Depth i offers its top (budget+1-i) tokens; the best `budget` by path score are kept.
    A child never outscores its parent, so kept nodes always have their parent kept."""
    k = mask_logprobs.shape[0]
    pool = expand_top1(mask_logprobs, root, [budget + 1 - i for i in range(1, k + 1)])
    ranked = sorted(range(len(pool)), key=lambda i: (-pool[i].score, pool[i].depth))[:budget]
    keep = sorted(ranked, key=lambda i: (pool[i].depth, -pool[i].score))
    remap = {old: new for new, old in enumerate(keep)}
    return [Candidate(pool[i].depth, pool[i].token, pool[i].score, remap.get(pool[i].parent, -1)) for i in keep]


def insert_candidates(tree: DraftTree, candidates: list[Candidate], budget: int) -> list[int]:
    """Add candidates to `tree` (merging equal siblings) until it holds `budget` nodes.
    Returns each candidate's tree row, or -1 where it did not fit."""
    rows: list[int] = []
    for cand in candidates:
        parent_row = 0 if cand.parent < 0 else rows[cand.parent]
        if parent_row < 0:
            rows.append(-1)
            continue
        row = tree.child(parent_row, cand.token)
        if row is None and tree.num_nodes < budget:
            row = tree.add(parent_row, cand.token)
        rows.append(-1 if row is None else row)
    return rows


class EspProposer(Proposer):
    def __init__(self, model, spec: SpecConfig, tuner: "BudgetTuner | None" = None) -> None:
        super().__init__(model, spec)
        self.tuner = tuner if spec.adaptive else None
        self._offered_width = 0
        self.num_masks = spec.num_masks
        self.num_prefill_masks = spec.num_masks
        self.lam = spec.ema_lambda
        self._mask: torch.Tensor | None = None
        # Committed tokens not yet folded into `mask`: the update waits until a mask row is
        # needed, so passes the load tuner runs without masks (a full batch) pay nothing for it.
        self._pending: list[int] = []
        self.mask_logprobs: torch.Tensor | None = None  # [k, V]

    @classmethod
    def block_rows(cls, spec: SpecConfig) -> int:
        return (spec.num_masks + 1) * (1 + spec.esp_node_budget)

    def nodes_beside_extras(self, context: list[int], budget: DraftBudget) -> int | None:
        return self.masked_nodes(budget)

    def masked_nodes(self, budget: DraftBudget) -> int | None:
        """Tree nodes that fit with k masks each, when there is room for the root's masks and at
        least one masked node."""
        per_row = self.num_masks + 1
        return budget.max_rows // per_row - 1 if budget.max_rows >= 2 * per_row else None

    def begin(self, prompt_ids: list[int], prompt_embeds: torch.Tensor) -> None:
        self._mask = prompt_embeds.float().mean(dim=0)
        self._pending = []

    @property
    def mask(self) -> torch.Tensor | None:
        """The mask embedding `m`, with every committed token applied."""
        self._fold_pending()
        return self._mask

    def _fold_pending(self) -> None:
        if not self._pending or self._mask is None:
            return
        embeds = self.model.embed(torch.tensor(self._pending, device=self.model.device)).float()
        self._pending = []
        for e in embeds:  # once per token, in order: the same arithmetic as applying each at once
            self._mask.add_(e - self._mask, alpha=self.lam)

    def mask_embedding(self) -> torch.Tensor:
        return self.mask.to(self.model.dtype)

    @property
    def has_guesses(self) -> bool:
        return self.mask_logprobs is not None

    def on_prefill(self, mask_logits: torch.Tensor | None) -> None:
        self._read_masks(mask_logits)

    def on_commit(self, token_ids: list[int]) -> None:
        if not token_ids or self.lam == 0.0:
            return
        self._pending.extend(token_ids)
        if len(self._pending) >= 256:  # keep the list short
            self._fold_pending()

    def esp_candidates(self, root: int, budget: int) -> list[Candidate]:
        if self.mask_logprobs is None or budget <= 0:
            return []
        if self.tuner is not None:
            self._offered_width = self.tuner.best_width(budget)
            return static_tree_candidates(self.mask_logprobs, root, (self._offered_width,))
        if self.spec.tree is not None and budget >= sum(self.spec.tree):
            return static_tree_candidates(self.mask_logprobs, root, self.spec.tree)
        return dynamic_tree_candidates(self.mask_logprobs, root, budget)

    def propose(self, context: list[int], max_nodes: int, extras: bool = True) -> Draft:
        tree = DraftTree()
        budget = min(self.spec.esp_node_budget, max_nodes)
        insert_candidates(tree, self.esp_candidates(context[-1], budget), budget)
        return self._draft(tree, extras)

    def _draft(self, tree: DraftTree, extras: bool) -> Draft:
        if not extras:  # no masks this step: the next one has no fresh guesses and drafts nothing
            return Draft(tree)
        return Draft(tree, num_masks=self.num_masks, mask_embedding=self.mask_embedding())

    def readout_rows(self, draft: Draft, layout: BlockLayout, verdict: Verdict) -> slice | None:
        # The masks owned by the deepest accepted row guess the tokens after the next root.
        return layout.owner_mask_rows(verdict.deepest_row) if draft.num_masks else None

    def readout_candidates(self, draft: Draft, layout: BlockLayout) -> ReadoutCandidates | None:
        # Every tree row's masks, since any row may turn out the deepest accepted.
        if not draft.num_masks:
            return None
        return ReadoutCandidates(slice(layout.num_tree_rows, layout.lookahead_start), draft.num_masks)

    def observe(self, draft: Draft, layout: BlockLayout, readout: torch.Tensor | None, verdict: Verdict) -> None:
        if self.tuner is not None and self._offered_width:
            # ESP nodes come first in rank order (rows 1..width) when the tree is ESP's alone.
            first = verdict.accepted_rows[0] if verdict.accepted_rows else None
            rank = first - 1 if first is not None and first <= self._offered_width else None
            self.tuner.record(self._offered_width, rank)
            self._offered_width = 0
        self._read_masks(readout)

    def _read_masks(self, mask_logits: torch.Tensor | None) -> None:
        if mask_logits is None or mask_logits.shape[0] == 0:
            self.mask_logprobs = None
            return
        self.mask_logprobs = torch.log_softmax(mask_logits, dim=-1)
