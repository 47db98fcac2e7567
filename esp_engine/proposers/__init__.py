"""Drafting methods, by the name a `SpecConfig` gives them.

A new method is one proposer file, one line here and its presets in `config.py`; the engine,
the scheduler and the load tuner know methods only through the `Proposer` interface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import SpecConfig
from ..cost_model import BudgetTuner, StepCostModel
from .base import Draft, DraftBudget, Proposer
from .esp import EspProposer
from .hybrid import HybridProposer
from .lade import LadeProposer
from .pld import PldProposer

if TYPE_CHECKING:
    from ..model import LlamaFamilyModel

PROPOSERS: dict[str, type[Proposer]] = {
    "ar": Proposer,
    "esp": EspProposer,
    "pld": PldProposer,
    "lade": LadeProposer,
    "hybrid": HybridProposer,
}


def proposer_class(method: str) -> type[Proposer]:
    return PROPOSERS[method]


class ProposerFactory:
    """Makes each sequence's proposer; adaptive ESP widths learn across requests, so their
    tuners are shared, one per (method, budget)."""

    def __init__(self, model: "LlamaFamilyModel", step_costs: Callable[[], StepCostModel]) -> None:
        self.model = model
        self._step_costs = step_costs
        self._budget_tuners: dict[tuple[str, int], BudgetTuner] = {}

    def create(self, spec: SpecConfig) -> Proposer:
        cls = proposer_class(spec.method)
        if spec.adaptive:
            return cls(self.model, spec, self._budget_tuner(spec))  # type: ignore[call-arg]
        return cls(self.model, spec)

    def _budget_tuner(self, spec: SpecConfig) -> BudgetTuner:
        key = (spec.method, spec.esp_node_budget)
        if key not in self._budget_tuners:
            self._budget_tuners[key] = BudgetTuner(self._step_costs(), max_width=spec.esp_node_budget)
        return self._budget_tuners[key]


__all__ = ["Draft", "DraftBudget", "Proposer", "ProposerFactory", "PROPOSERS", "proposer_class"]
