"""Hybrid: one tree holding PLD's copied chain and ESP's mask candidates, under ESP's budget.

n-gram copying wins where output repeats the input (code, RAG, summaries); ESP wins where it
does not. When the suffix matches earlier text, the chain takes up to `pld_num_drafts` nodes
(leaving ESP at least `hybrid_min_esp_nodes`); ESP fills the rest, merged into the same trie.
Every tree row carries ESP masks, so ESP keeps learning even while a chain is accepted.
"""

from __future__ import annotations

from ..config import SpecConfig
from ..tree import DraftTree
from .base import Draft, DraftBudget
from .esp import EspProposer, insert_candidates
from .pld import PldProposer


# The load tuner's name for hybrid's drafts of ESP masks alone (no chain to copy, under a cap):
# whether they pay decides whether the next ones are drafted at all.
MASKS_ONLY = "hybrid-masks"


class HybridProposer(EspProposer):
    def __init__(self, model, spec: SpecConfig, tuner=None) -> None:
        super().__init__(model, spec, tuner)
        self.pld = PldProposer(model, spec)
        self._chains: tuple[int, list[list[int]]] = (-1, [])  # (context length, its chains)

    @property
    def has_guesses(self) -> bool:
        """Always: the PLD half drafts from the context alone, so every pass counts for the tuner,
        those without ESP guesses too."""
        return True

    def nodes_beside_extras(self, context: list[int], budget: DraftBudget) -> int | None:
        # Short of room, a copied chain is worth its rows far more often than mask guesses,
        # which would also double every row: the chain takes the whole share, without masks.
        # Without a chain, masks are drafted only where they were seen to pay (on a CPU they rarely do).
        if self.chains(context):
            return None
        nodes = self.masked_nodes(budget)
        return nodes if nodes is not None and budget.pays(MASKS_ONLY, budget.max_rows) else None

    def tuner_keys(self, draft: Draft, budget: DraftBudget) -> tuple[str, ...]:
        if draft.num_masks and budget.max_rows < self.max_block_rows:
            return (self.tuner_key, MASKS_ONLY)
        return (self.tuner_key,)

    def chains(self, context: list[int]) -> list[list[int]]:
        """PLD's chains for this context (asked by `fit`, then by `propose`, once per step)."""
        if self._chains[0] != len(context):
            self._chains = (len(context), self.pld.chains(context))
        return self._chains[1]

    def propose(self, context: list[int], max_nodes: int, extras: bool = True) -> Draft:
        budget = min(self.spec.esp_node_budget, max_nodes)
        # ESP's reserve only when it has guesses (none after a pass the engine ran without masks).
        reserve = self.spec.hybrid_min_esp_nodes if self.mask_logprobs is not None else 0
        # The reserve comes out of the configured budget, not out of a cap the engine sets for
        # this step (few tokens left, a full batch): under a cap the chain, which accepts far
        # more often than a mask guess, is drafted first, so hybrid never drafts less of it than PLD.
        chain_budget = min(max(0, self.spec.esp_node_budget - reserve), max_nodes)
        tree = DraftTree()
        if chain_budget:
            for chain in self.chains(context):
                tree.add_chain(0, chain, budget=chain_budget)
        insert_candidates(tree, self.esp_candidates(context[-1], budget), budget)
        return self._draft(tree, extras)
