"""The interface every drafting method implements.

A proposer is per sequence and keeps that sequence's drafting state. Each step the engine asks
it for a `Draft` (a token tree, plus mask or lookahead rows when the method uses them), runs
the block, verifies, and hands back what happened through `observe`. Proposers never touch
the KV cache and never choose committed tokens: that keeps every method lossless by design.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

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


class Proposer:
    """Drafts nothing: plain decoding. Subclasses override what they need."""

    num_prefill_masks = 0  # mask rows appended to the prompt at prefill

    def __init__(self, model: "LlamaFamilyModel") -> None:
        self.model = model

    def begin(self, prompt_ids: list[int], prompt_embeds: torch.Tensor) -> None:
        """Called once before prefill."""

    def mask_embedding(self) -> torch.Tensor | None:
        return None

    @property
    def has_guesses(self) -> bool:
        """Whether this step's draft can use what the previous pass taught it; False after a
        pass the engine ran without mask rows (the load tuner does not count such a step)."""
        return True

    def on_prefill(self, mask_logits: torch.Tensor | None) -> None:
        """Logits of the prefill mask rows ([k, vocab]), if any."""

    def on_commit(self, token_ids: list[int]) -> None:
        """Tokens just committed to the sequence, in order."""

    def propose(self, context: list[int], max_nodes: int, extras: bool = True) -> Draft:
        """Draft continuations of `context` (prompt + output; its last token is the root).

        At most `max_nodes` tree nodes; with `extras` False, no rows beyond the tree (no ESP
        masks, no lookahead window): the engine's way to shrink a step under load."""
        return Draft(DraftTree())

    def readout_rows(self, draft: Draft, layout: BlockLayout, verdict: Verdict) -> slice | None:
        """Rows of the block whose logits `observe` needs (the engine computes the logits of all
        sequences in one pass over the LM head)."""
        return None

    def observe(self, draft: Draft, layout: BlockLayout, readout: torch.Tensor | None, verdict: Verdict) -> None:
        """After verification: the logits of `readout_rows`, and which rows were accepted."""
