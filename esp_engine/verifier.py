"""Tree verification: commit the longest path the target model itself would have produced.

Terms: the *root* is the last committed token (row 0); a *draft node* is accepted when the
token the model chooses at its parent equals the node's token; the *bonus* token is the
model's choice at the deepest accepted row. Committed tokens = accepted nodes + bonus, all
chosen by `TokenChooser`, so the result equals plain decoding for greedy and sampling alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import TokenChooser
from .tree import DraftTree


@dataclass(slots=True)
class Verdict:
    accepted_rows: list[int]  # tree rows of accepted draft nodes, root excluded, in path order
    committed: list[int]  # tokens of the accepted nodes, then the bonus token

    @property
    def num_accepted(self) -> int:
        return len(self.accepted_rows)

    @property
    def deepest_row(self) -> int:
        return self.accepted_rows[-1] if self.accepted_rows else 0


def verify(tree: DraftTree, tree_logits: torch.Tensor, chooser: TokenChooser,
           greedy_choices: list[int] | None = None) -> Verdict:
    """Walk the tree from the root. `tree_logits` is [1 + N, V], one row per tree row;
    `greedy_choices`, their argmax where the caller took it already (for a whole batch at once)."""
    children = tree.children_map()
    if chooser.is_greedy:
        if greedy_choices is None:
            greedy_choices = tree_logits.argmax(dim=-1).tolist()  # one op for all rows; the walk is pure Python
        pick = greedy_choices.__getitem__
    else:
        pick = lambda row: chooser.choose(tree_logits[row])  # noqa: E731 - only visited rows are sampled
    accepted: list[int] = []
    committed: list[int] = []
    row = 0
    while True:
        token = pick(row)
        committed.append(token)
        child = children[row].get(token)
        if child is None:
            return Verdict(accepted, committed)
        accepted.append(child)
        row = child
