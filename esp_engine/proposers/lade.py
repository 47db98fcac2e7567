"""LADE (lookahead decoding): Jacobi iterations in a 2-D window feed an n-gram pool.

The window holds the last `level-1` Jacobi iterations over `window` lanes. Each pass, the
model's guesses at the window's last row become its next row, and every lane yields an
n-gram (its column top to bottom plus the new guess) for the pool. Pool n-grams that start
with the root are verified in the same pass as a trie.
"""

from __future__ import annotations

import random

import torch

from ..config import SpecConfig
from ..tree import BlockLayout, DraftTree
from ..verifier import Verdict
from .base import Draft, DraftBudget, Proposer, ReadoutCandidates


class NgramPool:
    """n-grams keyed by their first token, most recent last, at most `capacity` per key."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.table: dict[int, list[tuple[int, ...]]] = {}

    def add(self, key: int, continuation: tuple[int, ...]) -> None:
        entries = self.table.setdefault(key, [])
        if continuation in entries:
            entries.remove(continuation)
        entries.append(continuation)
        if len(entries) > self.capacity:
            del entries[0]

    def lookup(self, key: int, limit: int) -> list[tuple[int, ...]]:
        return self.table.get(key, [])[-limit:][::-1] if limit > 0 else []


class LadeProposer(Proposer):
    def __init__(self, model, spec: SpecConfig) -> None:
        super().__init__(model, spec)
        self.rows = spec.lade_level - 1
        self.cols = spec.lade_window
        self.pool = NgramPool(capacity=max(spec.lade_guess, 1) * 2)
        self.window: list[list[int]] = []

    @classmethod
    def block_rows(cls, spec: SpecConfig) -> int:
        return 1 + (spec.lade_level - 1) * (spec.lade_window + spec.lade_guess)

    def nodes_beside_extras(self, context: list[int], budget: DraftBudget) -> int | None:
        window = self.rows * self.cols  # the window, and pool n-grams in what is left
        return budget.max_rows - 1 - window if budget.max_rows > window + 1 else None

    def begin(self, prompt_ids: list[int], prompt_embeds: torch.Tensor) -> None:
        # Like the reference implementation, start the window from prompt tokens; seeded by the
        # prompt so a run is repeatable.
        rng = random.Random(len(prompt_ids) * 1_000_003 + sum(prompt_ids[-8:]))
        self.window = [[rng.choice(prompt_ids) for _ in range(self.cols)] for _ in range(self.rows)]

    def propose(self, context: list[int], max_nodes: int, extras: bool = True) -> Draft:
        tree = DraftTree()
        for ngram in self.pool.lookup(context[-1], self.spec.lade_guess):
            tree.add_chain(0, list(ngram), budget=max_nodes)
        if not extras:  # the window waits for a step with room; the pool still drafts
            return Draft(tree)
        tokens = [t for row in self.window for t in row]
        return Draft(tree, lookahead_shape=(self.rows, self.cols), lookahead_tokens=tokens)

    def readout_rows(self, draft: Draft, layout: BlockLayout, verdict: Verdict) -> slice | None:
        return layout.lookahead_row(self.rows - 1) if draft.lookahead_tokens else None

    def readout_candidates(self, draft: Draft, layout: BlockLayout) -> ReadoutCandidates | None:
        # The window's last row is read whatever is accepted.
        if not draft.lookahead_tokens:
            return None
        return ReadoutCandidates.whole(layout.lookahead_row(self.rows - 1))

    def observe(self, draft: Draft, layout: BlockLayout, readout: torch.Tensor | None, verdict: Verdict) -> None:
        if readout is None:
            return
        guesses = readout.argmax(dim=-1).tolist()
        for c in range(self.cols):
            column = [self.window[r][c] for r in range(self.rows)] + [guesses[c]]
            self.pool.add(column[0], tuple(column[1:]))
        self.window = self.window[1:] + [guesses]
