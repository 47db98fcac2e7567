"""The adaptive tree width follows measured cost and observed acceptance."""

import pytest

from esp_engine.config import SpecConfig
from esp_engine.cost_model import BudgetTuner, StepCostModel
from esp_engine.errors import InvalidSpecConfigError


def test_cost_interpolates_and_extrapolates():
    costs = StepCostModel(rows=[1, 4, 8], seconds=[1.0, 1.0, 2.0])
    assert costs.cost(1) == 1.0 and costs.cost(6) == pytest.approx(1.5) and costs.cost(12) == pytest.approx(3.0)


def test_flat_cost_takes_the_widest_tree():
    tuner = BudgetTuner(StepCostModel([1, 64], [1.0, 1.0]), max_width=14)
    assert tuner.best_width() == 14
    assert tuner.best_width(limit=3) == 3


def test_costly_rows_and_rare_acceptance_shrink_the_tree():
    tuner = BudgetTuner(StepCostModel([1, 4, 30], [1.0, 1.0, 3.0]), max_width=14)
    for _ in range(500):
        tuner.record(width=14, accepted_rank=None)  # nothing beyond rank 0 is ever accepted
    assert tuner.best_width() == 1


def test_frequent_acceptance_of_lower_ranks_widens_it():
    tuner = BudgetTuner(StepCostModel([1, 4, 8, 30], [1.0, 1.0, 1.1, 3.0]), max_width=14)
    for i in range(600):
        tuner.record(width=3, accepted_rank=i % 3)  # each of the top 3 accepted a third of the time
    assert tuner.best_width() == 3


def test_adaptive_needs_one_mask():
    assert SpecConfig.from_preset("esp", "auto").adaptive
    with pytest.raises(InvalidSpecConfigError, match="adaptive"):
        SpecConfig(method="esp", num_masks=2, tree=None, adaptive=True)
