"""The adaptive tree width follows measured cost and observed acceptance."""

import pytest

from esp_engine.config import SpecConfig
from esp_engine.cost_model import BudgetTuner, LoadTuner, PassFeedback, SequenceFeedback, StepCostModel
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


# ---- the load tuner: rows per sequence for a batched pass -------------------------------------

FLAT = StepCostModel(rows=[1, 64], seconds=[0.010, 0.0101])  # a GPU at small batch: rows are free
STEEP = StepCostModel(rows=[1, 4, 10, 30, 60], seconds=[0.0145, 0.0167, 0.0213, 0.037, 0.0627], per_sequence=0.0005)


def learn(tuner: LoadTuner, key: str, share: int, tokens: float, rows: int) -> None:
    """An untimed pass in which one sequence drafting under `key` at `share` rows committed `tokens`."""
    tuner.observe(PassFeedback(1, rows, share > 1, None, int(tokens), [SequenceFeedback((key,), share, tokens, rows)]))


def timed(tuner: LoadTuner, num_sequences: int, num_rows: int, speculative: bool, seconds: float,
          tokens: int | None = None) -> None:
    """A decode pass that took `seconds` and committed `tokens` (one per sequence unless said)."""
    tuner.observe(PassFeedback(num_sequences, num_rows, speculative, seconds,
                               num_sequences if tokens is None else tokens))


def _trained(costs: StepCostModel, tokens_at: dict[int, float]) -> LoadTuner:
    tuner = LoadTuner(costs)
    for share, tokens in tokens_at.items():
        for _ in range(200):
            learn(tuner, "esp", share, tokens, rows=share)
    return tuner


def test_load_tuner_keeps_big_trees_when_rows_are_free():
    tuner = _trained(FLAT, {s: 1 + 0.1 * s ** 0.5 for s in (2, 3, 4, 6, 8, 12, 16, 24, 32)})
    assert tuner.choose(["esp"], [32]) == 32
    assert tuner.choose(["esp"] * 8, [32] * 8) == 32


def test_load_tuner_falls_back_to_plain_decoding_when_speculation_does_not_pay():
    # About ESP's acceptance on SmolLM2 (tau 1.13 at 10 rows, 1.21 at 30) against the CPU's step cost.
    tuner = _trained(STEEP, {s: 1 + 0.02 * s if s < 10 else 1.13 + 0.004 * (s - 10) for s in (2, 3, 4, 6, 8, 12, 16, 24, 32)})
    assert tuner.choose(["esp"], [32]) == 1
    assert tuner.choose(["ar", "esp"], [1, 32]) == 1


def test_load_tuner_shrinks_the_share_as_the_batch_grows():
    tuner = _trained(STEEP, {2: 1.5, 3: 1.8, 4: 2.0, 6: 2.2, 8: 2.3, 12: 2.4, 16: 2.5, 24: 2.5, 32: 2.5})
    shares = [tuner.choose(["pld"] * n, [32] * n) for n in (1, 4, 16)]
    assert shares[0] > 1 and shares == sorted(shares, reverse=True) and shares[-1] < shares[0]


def test_load_tuner_tries_untested_shares_only_at_small_batches():
    fresh = LoadTuner(FLAT)
    assert fresh.choose(["pld"], [16]) > 1  # alone: an optimistic guess costs one cheap pass
    assert fresh.choose(["pld"] * 8, [16] * 8) == 1  # eight at once: nothing known, nothing risked
    for _ in range(50):
        learn(fresh, "pld", 16, 3, rows=10)
    assert fresh.choose(["pld"] * 8, [16] * 8) == 16  # once measured, it pays at any batch


def test_load_tuner_speculates_at_large_batches_only_when_clearly_ahead():
    for gain, expected in ((1.05, 1), (1.3, 2)):
        tuner = LoadTuner(FLAT)
        for _ in range(200):
            learn(tuner, "pld", 2, gain, rows=2)
        assert tuner.choose(["pld"], [2]) == 2  # alone, any predicted gain is taken
        # Eight at once: a 5% predicted gain is within the cost model's error, so plain decoding.
        assert tuner.choose(["pld"] * 8, [2] * 8) == expected


def test_load_tuner_corrects_its_cost_model_from_measured_passes():
    tuner = LoadTuner(FLAT)
    for _ in range(200):
        learn(tuner, "pld", 4, 1.5, rows=4)
    assert tuner.choose(["pld"] * 8, [4] * 8) == 4  # modelled: 1.5x the tokens for free rows
    for _ in range(5):  # measured: speculative passes of eight take twice what the model says
        timed(tuner, 8, 32, True, 2 * FLAT.batch_cost(32, 8), tokens=12)
        timed(tuner, 8, 8, False, FLAT.batch_cost(8, 8))
    assert tuner.correction(True, 8) > 1.8 and tuner.correction(False, 8) == pytest.approx(1.0)
    assert tuner.choose(["pld"] * 8, [4] * 8) == 1
    assert tuner.choose(["pld"], [4]) > 1  # one sequence alone: another batch size, still as modelled


def test_load_tuner_counts_an_unmeasured_speculative_pass_as_slow_as_measured_plain_ones():
    tuner = LoadTuner(FLAT)
    for _ in range(5):
        timed(tuner, 16, 16, False, 1.4 * FLAT.batch_cost(16, 16))
    assert tuner.correction(False, 16) == pytest.approx(1.4)
    assert tuner.correction(True, 16) == pytest.approx(1.4)


def test_load_tuner_stops_speculating_where_it_measured_a_loss_and_rechecks_later():
    tuner = LoadTuner(FLAT)
    for _ in range(200):
        learn(tuner, "pld", 4, 1.5, rows=4)
    plain = FLAT.batch_cost(8, 8)

    def plain_passes(n: int) -> None:
        for _ in range(n):
            timed(tuner, 8, 8, False, plain)

    plain_passes(1)
    assert tuner.choose(["pld"] * 8, [4] * 8) == 4  # the model predicts 1.5x
    # Measured: speculative passes of eight commit 9 tokens in the time plain ones commit 8 in
    # 0.8 of it, i.e. 0.9x; whatever the model says, plain decoding it is.
    timed(tuner, 8, 32, True, plain / 0.8, tokens=9)
    assert tuner.measured_gain(8) == pytest.approx(0.9)
    assert tuner.choose(["pld"] * 8, [4] * 8) == 1
    assert tuner.choose(["pld"], [4]) > 1  # alone: another batch size, nothing measured there
    plain_passes(tuner.config.probe_every)
    assert tuner.choose(["pld"] * 8, [4] * 8) == 1  # a measured loss doubled the wait ...
    plain_passes(tuner.config.probe_every)
    assert tuner.choose(["pld"] * 8, [4] * 8) == 4  # ... to 64 passes: a re-check is due,
    assert tuner.choose(["pld"] * 8, [4] * 8) == 1  # once, even if that pass went unmeasured
    timed(tuner, 8, 32, True, plain, tokens=12)  # this time speculation paid: 1.5x
    assert tuner.measured_gain(8) > 1.0
    assert tuner.choose(["pld"] * 8, [4] * 8) == 4


def test_load_tuner_at_small_batches_tries_its_best_share_again_after_a_run_of_plain_passes():
    # Early requests whose drafts were all rejected (text with nothing to copy or guess): every
    # share recorded one token for two rows, and plain decoding would otherwise be chosen for ever.
    tuner = LoadTuner(STEEP)
    for share in (2, 3, 4, 6, 8, 12, 16):
        for _ in range(200):
            learn(tuner, "pld", share, 1, rows=2)
    choices = [tuner.choose(["pld"], [16]) for _ in range(300)]
    tries = [i for i, c in enumerate(choices) if c != 1]
    # The first try after 32 plain passes; each try after which plain still wins doubles the wait.
    assert tries[0] == tuner.config.probe_every and len(tries) == 3
    assert tries[2] - tries[1] > tries[1] - tries[0] > tuner.config.probe_every
    assert [tuner.choose(["pld"] * 8, [16] * 8) for _ in range(100)] == [1] * 100  # never at a big batch


def test_load_tuner_says_whether_a_share_pays_for_one_sequence_alone():
    tuner = LoadTuner(STEEP)
    assert tuner.pays_alone("hybrid-masks", 8)  # untried: its optimistic prior
    for _ in range(50):
        learn(tuner, "hybrid-masks", 8, 1.1, rows=8)  # 10% more tokens for 30% more time
    assert not tuner.pays_alone("hybrid-masks", 8)
    flat = LoadTuner(FLAT)
    for _ in range(50):
        learn(flat, "hybrid-masks", 8, 1.1, rows=8)  # rows cost nothing: any gain pays
    assert flat.pays_alone("hybrid-masks", 8)
