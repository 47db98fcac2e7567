"""Our CPU linear kernel computes x W^T + b, and a row's bits never depend on the rows beside it,
the thread count, or how the outputs are split; where it cannot run, PackedLinear keeps oneDNN."""

import pytest
import torch

from esp_engine import cpu_linear
from esp_engine.cpu_info import parse_cpu_info
from esp_engine.model import PackedLinear

DTYPES = [torch.float32, torch.bfloat16]


def needs_kernel(dtype):
    if not cpu_linear.supports(dtype):
        pytest.skip(f"no kernel for {dtype} here: {cpu_linear.status().reason}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_features, in_features", [(960, 576), (37, 19), (16, 2), (100, 33), (1, 64)])
def test_it_computes_the_linear_for_any_shape(dtype, out_features, in_features):
    needs_kernel(dtype)
    gen = torch.Generator().manual_seed(out_features * in_features)
    w = torch.randn(out_features, in_features, generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype)
    packed = cpu_linear.pack(w)
    for rows in (1, 5, 6, 7, 13, 130):
        x = torch.randn(rows, in_features, generator=gen).to(dtype)
        want = torch.nn.functional.linear(x.double(), w.double(), b.double())
        for bias in (b, None):
            got = cpu_linear.linear(x, packed, out_features, bias)
            assert got.dtype == dtype and got.shape == (rows, out_features)
            ref = want if bias is not None else want - b.double()
            # float32 sums of K products; bf16 adds one rounding of the output (8 bits).
            tol = 1e-5 * in_features if dtype == torch.float32 else 2**-7
            assert torch.allclose(got.double(), ref, rtol=tol, atol=tol * (1 + ref.abs().max().item())), rows


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_gets_the_same_bits_in_any_call_and_with_any_thread_count(dtype):
    needs_kernel(dtype)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(1000, 576, generator=gen).to(dtype)  # 62.5 blocks of 16 outputs: a ragged split
    b = torch.randn(1000, generator=gen).to(dtype)
    packed = cpu_linear.pack(w)
    x = torch.randn(70, 576, generator=gen).to(dtype)
    alone = torch.cat([cpu_linear.linear(x[i : i + 1], packed, 1000, b) for i in range(70)])
    for rows in (2, 3, 6, 7, 12, 17, 33, 70):
        for start in (0, 70 - rows):
            got = cpu_linear.linear(x[start : start + rows], packed, 1000, b)
            assert torch.equal(got, alone[start : start + rows]), (rows, start)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_linear.linear(x, packed, 1000, b), alone)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_linear_runs_on_it_where_it_can_and_says_so(dtype):
    needs_kernel(dtype)
    w, b = torch.randn(48, 32).to(dtype), torch.randn(48).to(dtype)
    linear = PackedLinear(w, b)
    assert linear.backend == "ours" and linear.kind() == f"PackedLinear[48x32+bias, {str(dtype)[6:]}, ours]"
    x = torch.randn(5, 32).to(dtype)
    assert torch.equal(linear(x), cpu_linear.linear(x, linear.packed, 48, b))


def test_without_the_kernel_packed_linear_keeps_onednn_and_the_log_says_why(monkeypatch):
    monkeypatch.setattr(cpu_linear, "_status", cpu_linear.KernelStatus(None, frozenset(), "off for this test"))
    w = torch.randn(48, 32)
    linear = PackedLinear(w, None)
    assert linear.backend in ("onednn", "torch") and "ours" not in linear.kind()
    x = torch.randn(3, 32)
    torch.testing.assert_close(linear(x), x @ w.T)


def test_it_is_not_built_where_the_cpu_or_the_switch_says_no(monkeypatch):
    monkeypatch.setattr(cpu_linear, "cpu_info", lambda: parse_cpu_info("flags\t\t: fpu sse2 avx2 fma\n"))
    status = cpu_linear._load()
    assert status.module is None and not status.dtypes and "avx512f" in status.reason
    monkeypatch.setenv(cpu_linear.ENV_SWITCH, "0")
    status = cpu_linear._load()
    assert status.module is None and "ESP_SERVE_CPU_KERNEL=0" in status.reason


def test_bf16_needs_the_cpu_s_bf16_dot_products(monkeypatch):
    if cpu_linear.status().module is None:
        pytest.skip(cpu_linear.status().reason)
    monkeypatch.setattr(cpu_linear, "cpu_info",
                        lambda: parse_cpu_info("flags\t\t: avx2 fma avx512f avx512bw avx512vl avx512dq\n"))
    status = cpu_linear._load()  # compiled already: loads from the cache
    assert status.dtypes == {torch.float32}
