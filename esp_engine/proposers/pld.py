"""PLD (prompt lookup decoding): copy what followed the latest earlier match of the suffix."""

from __future__ import annotations

import numpy as np

from ..config import SpecConfig
from ..tree import DraftTree
from .base import Draft, Proposer


def find_ngram_drafts(context: np.ndarray, max_ngram: int, min_ngram: int, num_drafts: int,
                      num_candidates: int = 1) -> list[list[int]]:
    """Continuations of the longest suffix n-gram (n = max..min) found earlier in `context`.

    Latest occurrence first; up to `num_candidates` continuations that start with different
    tokens, each at most `num_drafts` long. Empty when nothing matches.
    """
    length = len(context)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = context[length - n:]
        starts = np.flatnonzero(context[: length - n] == suffix[0])  # start <= length-n-1: a continuation exists
        for j in range(1, n):
            starts = starts[context[starts + j] == suffix[j]]
        if starts.size == 0:
            continue
        drafts: list[list[int]] = []
        seen_first: set[int] = set()
        for start in starts[::-1].tolist():
            cont = context[start + n : start + n + num_drafts].tolist()
            if cont[0] in seen_first:
                continue
            seen_first.add(cont[0])
            drafts.append(cont)
            if len(drafts) == num_candidates:
                break
        return drafts
    return []


class PldProposer(Proposer):
    @classmethod
    def block_rows(cls, spec: SpecConfig) -> int:
        return 1 + spec.pld_num_drafts * spec.pld_num_candidates

    def chains(self, context: list[int]) -> list[list[int]]:
        s = self.spec
        return find_ngram_drafts(np.asarray(context, dtype=np.int64), s.pld_max_ngram, s.pld_min_ngram,
                                 s.pld_num_drafts, s.pld_num_candidates)

    def propose(self, context: list[int], max_nodes: int, extras: bool = True) -> Draft:
        tree = DraftTree()
        if max_nodes <= 0:  # plain decoding this step (few tokens left, or a full batch): skip the search
            return Draft(tree)
        for chain in self.chains(context):
            tree.add_chain(0, chain, budget=max_nodes)
        return Draft(tree)
