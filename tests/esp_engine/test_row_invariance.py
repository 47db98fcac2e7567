"""A row's result must not depend on how many rows share its matmul call.

Speculative decoding computes a token inside a verify block of many rows; plain decoding
computes it alone. GEMM kernels chosen by row count round differently, so the model's linears
call their kernel only with row counts that agree (a `RowPlan`), found by probing at load.
"""

import json

import pytest
import torch

from esp_engine.model import PackedLinear
from esp_engine.row_invariance import RowPlan, machine_key, probe, probe_model


def rows_then(kernel_for):
    """A matmul whose rounding depends on the call's row count, as a GEMM library's does."""
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    calls: list[int] = []

    def matmul(x):
        calls.append(x.shape[0])
        return (x[:, None, :] * weight).sum(-1) + kernel_for(x.shape[0])  # exact per row by construction

    return matmul, calls


def test_a_plan_pads_short_calls_and_chunks_long_ones():
    matmul, calls = rows_then(lambda m: 0.0)
    plan = RowPlan(min_rows=2, max_rows=8)
    x = torch.randn(21, 16)
    assert torch.equal(plan.apply(matmul, x[:1]), matmul(x[:1].repeat(2, 1))[:1])
    calls.clear()
    out = plan.apply(matmul, x)
    assert out.shape == (21, 8)
    assert calls == [8, 8, 5]
    calls.clear()
    plan.apply(matmul, x[:17])  # 8 + 8 + 1: the last chunk is padded up to min_rows
    assert calls == [8, 8, 2]
    assert all(2 <= m <= 8 for m in calls)


def test_the_default_plan_calls_the_kernel_as_it_is():
    matmul, calls = rows_then(lambda m: 0.0)
    RowPlan().apply(matmul, torch.randn(300, 16))
    assert calls == [300]


def test_probe_finds_a_one_row_kernel_that_rounds_differently():
    matmul, _ = rows_then(lambda m: 1e-3 if m == 1 else 0.0)
    plan = probe(matmul, 16, torch.float32, "cpu")
    assert plan.min_rows == 2 and plan.max_rows == 128


def test_probe_finds_where_a_wide_kernel_starts():
    matmul, _ = rows_then(lambda m: 1e-3 if m > 40 else 0.0)
    assert probe(matmul, 16, torch.float32, "cpu") == RowPlan(1, 32)


def test_probe_of_an_invariant_kernel_leaves_calls_whole_up_to_what_it_tried():
    matmul, _ = rows_then(lambda m: 0.0)
    assert probe(matmul, 16, torch.float32, "cpu") == RowPlan(1, 128)


def _row_by_row(linear: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([linear(x[i : i + 1]) for i in range(x.shape[0])])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_linear_of_the_loaded_model_gives_a_row_the_same_result_in_any_call(dtype, request):
    model = request.getfixturevalue("smol" if dtype == "float32" else "smol_bf16").model
    seen = set()
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for linear in (m for m in model.modules() if isinstance(m, PackedLinear)):
            if linear.kind() in seen:
                continue
            seen.add(linear.kind())
            x = torch.randn(130, linear.in_features, generator=gen).to(linear.activation_dtype())
            alone = _row_by_row(linear, x)
            for m in (2, 3, 5, 8, 16, 17, 33, 64, 100, 130):
                assert torch.equal(linear(x[:m]), alone[:m]), f"{linear.kind()} at {m} rows"
    assert len(seen) >= 5  # qkv, o, gate_up, down, LM head


def test_probed_plans_are_kept_per_machine_and_read_back(tmp_path):
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(PackedLinear(torch.randn(96, 64, generator=gen), None),
                                PackedLinear(torch.randn(64, 96, generator=gen), torch.randn(64, generator=gen)),
                                PackedLinear(torch.randn(96, 64, generator=gen), None))  # the first one's kind again
    cache = tmp_path / "row_plans.json"
    plans = probe_model(model, cache)
    assert len(plans) == 2 and model[2].row_plan == model[0].row_plan
    stored = json.loads(cache.read_text())
    assert list(stored) == [machine_key("cpu")]
    assert {k: RowPlan(*v) for k, v in stored[machine_key("cpu")].items()} == plans
    # A second start reads them instead of probing: a planted entry shows it was read.
    kind = model[0].kind()
    stored[machine_key("cpu")][kind] = [1, 7]
    cache.write_text(json.dumps(stored))
    assert probe_model(model, cache)[kind] == RowPlan(1, 7)
    assert model[0].row_plan == RowPlan(1, 7)
