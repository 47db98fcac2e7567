"""An ESP block's next guesses (the logits of its deepest accepted row's masks) are read in the
same pass over the LM head as the verifying rows wherever the measured head cost says one
larger call is cheaper than two, and the tokens are the same either way."""

import pytest

from esp_engine.config import SamplingParams, SpecConfig
from esp_engine.cost_model import StepCostModel
from tests.conftest import chat_ids

ROWS = [1, 8, 64]
FLAT_HEAD = [0.010, 0.010, 0.011]  # reading the weights is the cost: rows are nearly free
STEEP_HEAD = [0.001, 0.008, 0.064]  # arithmetic is the cost: every row counts


def costs(head: list[float] | None) -> StepCostModel:
    return StepCostModel(rows=ROWS, seconds=[0.02, 0.02, 0.03], head_seconds=head)


def test_one_head_call_pays_where_rows_are_nearly_free():
    # 5 verifying rows; 5 mask rows of which the readout takes 1
    assert costs(FLAT_HEAD).one_head_call_pays(choosing=5, extra=5, taken=1)
    assert not costs(STEEP_HEAD).one_head_call_pays(choosing=5, extra=5, taken=1)
    assert not costs(None).one_head_call_pays(choosing=5, extra=5, taken=1)  # not measured: two calls


def test_measured_costs_include_the_head(tiny):
    measured = StepCostModel.measure(tiny.model, rows=(1, 4), context=8, repeats=1)
    assert measured.head_seconds is not None and len(measured.head_seconds) == 2
    assert measured.head_cost(0) == 0.0 and measured.head_cost(4) > 0


@pytest.mark.parametrize("method", ["esp", "hybrid"])
def test_one_or_two_head_calls_give_the_same_tokens(smol, smol_engine, spec_bench_questions, monkeypatch, method):
    model = smol_engine.model
    calls = []
    logits = model.logits
    monkeypatch.setattr(model, "logits", lambda hidden: calls.append(hidden.shape[0]) or logits(hidden))
    params = SamplingParams(max_new_tokens=24)
    spec = SpecConfig.from_preset(method, "bc10")
    for question in spec_bench_questions[:3]:
        prompt = chat_ids(smol.tokenizer, question["turns"][0])
        plain = smol_engine.generate(prompt, params, SpecConfig(method="ar"))
        runs = {}
        for name, head in (("two", STEEP_HEAD), ("one", FLAT_HEAD)):
            monkeypatch.setattr(smol_engine.runner, "step_costs", lambda head=head: costs(head))
            calls.clear()
            runs[name] = (smol_engine.generate(prompt, params, spec), len(calls))
        (two, two_calls), (one, one_calls) = runs["two"], runs["one"]
        assert one.output_ids == two.output_ids == plain.output_ids
        # one call over the head per pass (the prompt's and each block's), instead of two
        assert one_calls == 1 + one.num_decode_calls < two_calls
