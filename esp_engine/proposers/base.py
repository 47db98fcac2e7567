"""The interface every drafting method implements.

A proposer is per sequence and keeps that sequence's drafting state. It also owns every
decision that depends on its method: how many rows its block needs, how much KV slack its
prefill carries, how a draft shrinks to the rows the scheduler allows, and the names under
which the load tuner learns what its drafts are worth. Each step the model runner asks it for
a `Draft` (a token tree, plus mask or lookahead rows when the method uses them), runs the
block and verifies it; the scheduler hands back what happened through `observe`. Proposers
never touch the KV cache and never choose committed tokens: that keeps every method lossless
by design.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..config import SpecConfig
from ..tree import BlockLayout, DraftTree
from ..verifier import Verdict

if TYPE_CHECKING:
    from ..model import LlamaFamilyModel


@dataclass(slots=True)
class Draft:
    tree: DraftTree
    num_masks: int = 0  # k mask rows per tree row, fed `mask_embedding`
    mask_embedding: torch.Tensor | None = None  # [hidden]
    lookahead_shape: tuple[int, int] = (0, 0)  # (rows, columns) of a LADE window
    lookahead_tokens: list[int] = field(default_factory=list)  # row-major window tokens
    warm: bool = True  # drafted from what the previous pass taught (the load tuner learns only from these)
    tuner_keys: tuple[str, ...] = ()  # names under which the load tuner records this draft's yield


def always_pays(key: str, rows: int) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class ReadoutCandidates:
    """Rows a block's readout will be taken from (a slice of the block), and how many it takes."""

    rows: slice
    taken: int

    @classmethod
    def whole(cls, rows: slice) -> "ReadoutCandidates":
        """All of `rows`, read whatever is accepted."""
        return cls(rows, rows.stop - rows.start)

    @property
    def count(self) -> int:
        return self.rows.stop - self.rows.start

    @property
    def read_in_full(self) -> bool:
        return self.taken == self.count


@dataclass(frozen=True, slots=True)
class DraftBudget:
    """What one step allows a sequence's block."""

    max_rows: int  # rows the scheduler granted (root, tree, masks or window)
    max_nodes: int  # draft nodes that could still be committed (tokens left - 1)
    # Whether `rows` rows drafted under the tuner name `key` were seen to pay for one sequence
    # alone; without a load tuner everything may be tried.
    pays: Callable[[str, int], bool] = always_pays


class Proposer:
    """Drafts nothing: plain decoding. Subclasses override what they need."""

    num_prefill_masks = 0  # mask rows appended to the prompt at prefill

    def __init__(self, model: "LlamaFamilyModel", spec: SpecConfig) -> None:
        self.model = model
        self.spec = spec

    # ---- sizing (asked by the scheduler) ----------------------------------------------------
    @classmethod
    def block_rows(cls, spec: SpecConfig) -> int:
        """The most rows one decode block of this method can have (the preset's BC)."""
        return 1

    @property
    def max_block_rows(self) -> int:
        return self.block_rows(self.spec)

    @property
    def prefill_slack(self) -> int:
        """KV rows beyond the prompt its last prefill chunk needs: its masks, then room for the
        first decode block."""
        return self.num_prefill_masks + self.max_block_rows + 1

    # ---- drafting ------------------------------------------------------------------------------
    def begin(self, prompt_ids: list[int], prompt_embeds: torch.Tensor) -> None:
        """Called once before prefill."""

    def mask_embedding(self) -> torch.Tensor | None:
        return None

    def on_prefill(self, mask_logits: torch.Tensor | None) -> None:
        """Logits of the prefill mask rows ([k, vocab]), if any."""

    def on_commit(self, token_ids: list[int]) -> None:
        """Tokens just committed to the sequence, in order."""

    def draft(self, context: list[int], budget: DraftBudget) -> Draft:
        """The draft for this step, fitted into `budget`."""
        if budget.max_rows <= 1:  # plain decoding this pass: no search for a draft (a full batch pays it per sequence)
            return Draft(DraftTree(), warm=False)
        warm = self.has_guesses
        max_nodes, extras = self.fit(context, budget)
        draft = self.propose(context, max_nodes=max_nodes, extras=extras)
        draft.warm = warm
        draft.tuner_keys = self.tuner_keys(draft, budget) if warm else ()
        return draft

    @property
    def has_guesses(self) -> bool:
        """Whether this step's draft can use what the previous pass taught it; False after a
        pass that ran without mask rows (the load tuner does not count such a step)."""
        return True

    def fit(self, context: list[int], budget: DraftBudget) -> tuple[int, bool]:
        """Most draft nodes, and whether rows beyond the tree (masks, a window) fit, in `budget`
        (called with at least two rows)."""
        if budget.max_rows >= self.max_block_rows:
            return budget.max_nodes, True
        nodes = self.nodes_beside_extras(context, budget)
        if nodes is not None:
            return min(budget.max_nodes, nodes), True
        return min(budget.max_nodes, budget.max_rows - 1), False

    def nodes_beside_extras(self, context: list[int], budget: DraftBudget) -> int | None:
        """Under a cap smaller than the whole block: the tree nodes that fit beside this method's
        extra rows, or None to draft the tree alone."""
        return None

    @property
    def tuner_key(self) -> str:
        """The name under which the load tuner learns what this method's blocks yield."""
        return self.spec.method

    def tuner_keys(self, draft: Draft, budget: DraftBudget) -> tuple[str, ...]:
        """The load tuner's names for a warm draft's yield at `budget.max_rows` rows."""
        return (self.tuner_key,)

    def propose(self, context: list[int], max_nodes: int, extras: bool = True) -> Draft:
        """Draft continuations of `context` (prompt + output; its last token is the root).

        At most `max_nodes` tree nodes; with `extras` False, no rows beyond the tree (no ESP
        masks, no lookahead window): the way a step shrinks under load."""
        return Draft(DraftTree())

    def readout_rows(self, draft: Draft, layout: BlockLayout, verdict: Verdict) -> slice | None:
        """Rows of the block whose logits `observe` needs (the runner computes the logits of all
        sequences in one pass over the LM head)."""
        return None

    def readout_candidates(self, draft: Draft, layout: BlockLayout) -> ReadoutCandidates | None:
        """Before verification: the rows `readout_rows` will pick from, and how many it takes.
        The runner may compute their logits with the verifying rows' (one pass over the LM head
        instead of two) where its measured cost says that is cheaper. None: not known ahead."""
        return None

    def observe(self, draft: Draft, layout: BlockLayout, readout: torch.Tensor | None, verdict: Verdict) -> None:
        """After verification: the logits of `readout_rows`, and which rows were accepted."""
