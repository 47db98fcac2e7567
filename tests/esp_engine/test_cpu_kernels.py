"""Our CPU kernels compute x W^T + b and attention, and a row's bits never depend on the rows
beside it, the thread count, or how the work is split; where they cannot run, PackedLinear keeps
oneDNN."""

import pytest
import torch

from esp_engine import cpu_kernels
from esp_engine.cpu_info import parse_cpu_info
from esp_engine.model import PackedLinear

DTYPES = [torch.float32, torch.bfloat16]


def needs_kernel(dtype):
    if not cpu_kernels.supports_linear(dtype):
        pytest.skip(f"no kernel for {dtype} here: {cpu_kernels.status().reason}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_features, in_features", [(960, 576), (37, 19), (16, 2), (100, 33), (1, 64)])
def test_it_computes_the_linear_for_any_shape(dtype, out_features, in_features):
    needs_kernel(dtype)
    gen = torch.Generator().manual_seed(out_features * in_features)
    w = torch.randn(out_features, in_features, generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype)
    packed = cpu_kernels.pack(w)
    for rows in (1, 5, 6, 7, 13, 130):
        x = torch.randn(rows, in_features, generator=gen).to(dtype)
        want = torch.nn.functional.linear(x.double(), w.double(), b.double())
        for bias in (b, None):
            got = cpu_kernels.linear(x, packed, out_features, bias)
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
    packed = cpu_kernels.pack(w)
    x = torch.randn(70, 576, generator=gen).to(dtype)
    alone = torch.cat([cpu_kernels.linear(x[i : i + 1], packed, 1000, b) for i in range(70)])
    for rows in (2, 3, 6, 7, 12, 17, 33, 70):
        for start in (0, 70 - rows):
            got = cpu_kernels.linear(x[start : start + rows], packed, 1000, b)
            assert torch.equal(got, alone[start : start + rows]), (rows, start)
    assert torch.equal(on_one_thread(lambda: cpu_kernels.linear(x, packed, 1000, b)), alone)


def on_one_thread(call):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return call()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES)
def test_it_gives_the_float32_sums_that_its_output_rounds(dtype):
    """What the LM head uses: logits with no rounding to bf16, so its top tokens do not tie."""
    needs_kernel(dtype)
    gen = torch.Generator().manual_seed(5)
    w, b = torch.randn(100, 64, generator=gen).to(dtype), torch.randn(100, generator=gen).to(dtype)
    packed = cpu_kernels.pack(w)
    x = torch.randn(9, 64, generator=gen).to(dtype)
    sums = cpu_kernels.linear(x, packed, 100, b, float_out=True)
    assert sums.dtype == torch.float32
    assert torch.equal(sums.to(dtype), cpu_kernels.linear(x, packed, 100, b))
    assert torch.equal(sums[4:5], cpu_kernels.linear(x[4:5], packed, 100, b, float_out=True))
    torch.testing.assert_close(sums.double(), torch.nn.functional.linear(x.double(), w.double(), b.double()),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_weights_give_the_sums_of_the_same_integers_as_float_weights_times_their_scales(dtype):
    """int8 weights are widened in registers to exactly the float weights q, so a sum over them is
    the unquantized kernel's sum over q; the output's scale multiplies it once, then the bias."""
    needs_kernel(dtype)
    gen = torch.Generator().manual_seed(6)
    q = torch.randint(-127, 128, (100, 96), generator=gen, dtype=torch.int8)
    scales = torch.rand(100, generator=gen) / 50
    bias = torch.randn(100, generator=gen).to(dtype)
    packed = cpu_kernels.pack(q, activations=dtype)
    padded = cpu_kernels.pad_scales(scales, packed)
    as_float = cpu_kernels.pack(q.to(dtype))
    x = torch.randn(9, 96, generator=gen).to(dtype)
    sums = cpu_kernels.linear(x, as_float, 100, None, float_out=True)
    got = cpu_kernels.linear(x, packed, 100, None, float_out=True, scales=padded)
    assert torch.equal(got, sums * scales)
    with_bias = cpu_kernels.linear(x, packed, 100, bias, scales=padded)
    assert torch.equal(with_bias, (sums * scales + bias.float()).to(dtype))
    assert torch.equal(with_bias[3:4], cpu_kernels.linear(x[3:4], packed, 100, bias, scales=padded))
    with pytest.raises(RuntimeError, match="scales"):
        cpu_kernels.linear(x, packed, 100, None)


def needs_w8a8(dtype):
    if not cpu_kernels.supports_w8a8(dtype):
        pytest.skip(f"no W8A8 kernel for {dtype} here: {cpu_kernels.status().reason}")


def w8a8_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The scheme in float64: each row's values in groups of W8A8_GROUP (zeros past K), each group
    quantized as p = round(x * (127 / max|x|)) with scale max|x| / 127, then sum q p times both
    scales. Only the float32 accumulation over groups differs from the kernel."""
    g = cpu_kernels.W8A8_GROUP
    k = x.shape[1]
    width = -(-k // g) * g
    groups = torch.nn.functional.pad(x.float(), (0, width - k)).view(x.shape[0], -1, g)
    amax = groups.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    p = torch.round(groups * inverse).double()
    wq = torch.nn.functional.pad(q.double(), (0, width - k)).view(q.shape[0], -1, g)
    return torch.einsum("rgk,ngk,rg->rn", p, wq, (amax[..., 0] / 127).double()) * scales.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_features, in_features", [(100, 96), (37, 70), (300, 576), (16, 5)])
def test_w8a8_sums_int8_activations_per_group_times_the_int8_weights_and_both_scales(dtype, out_features,
                                                                                       in_features):
    needs_w8a8(dtype)
    gen = torch.Generator().manual_seed(out_features + in_features)
    q = torch.randint(-127, 128, (out_features, in_features), generator=gen, dtype=torch.int8)
    scales = torch.rand(out_features, generator=gen) / 50
    bias = torch.randn(out_features, generator=gen).to(dtype)
    packed = cpu_kernels.pack_w8a8(q)
    padded = cpu_kernels.pad_scales(scales, packed)
    for rows in (1, 2, 5, 13, 40):
        x = torch.randn(rows, in_features, generator=gen).to(dtype)
        want = w8a8_reference(x, q, scales)
        sums = cpu_kernels.linear(x, packed, out_features, None, float_out=True, scales=padded)
        assert sums.dtype == torch.float32
        torch.testing.assert_close(sums.double(), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
        with_bias = cpu_kernels.linear(x, packed, out_features, bias, scales=padded)
        assert with_bias.dtype == dtype and torch.equal(with_bias, (sums + bias.float()).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_w8a8_gives_a_row_the_same_bits_in_any_call_and_a_zero_row_its_bias(dtype):
    needs_w8a8(dtype)
    gen = torch.Generator().manual_seed(7)
    q = torch.randint(-127, 128, (1000, 576), generator=gen, dtype=torch.int8)  # a ragged split of blocks
    bias = torch.randn(1000, generator=gen).to(dtype)
    packed = cpu_kernels.pack_w8a8(q)
    padded = cpu_kernels.pad_scales(torch.rand(1000, generator=gen) / 50, packed)
    x = torch.randn(70, 576, generator=gen).to(dtype)
    x[5] = 0
    alone = torch.cat([cpu_kernels.linear(x[i : i + 1], packed, 1000, bias, scales=padded) for i in range(70)])
    assert torch.equal(alone[5], bias)
    for rows in (2, 3, 4, 6, 7, 12, 17, 33, 70):
        for start in (0, 70 - rows):
            got = cpu_kernels.linear(x[start : start + rows], packed, 1000, bias, scales=padded)
            assert torch.equal(got, alone[start : start + rows]), (rows, start)
    assert torch.equal(on_one_thread(lambda: cpu_kernels.linear(x, packed, 1000, bias, scales=padded)), alone)
    with pytest.raises(RuntimeError, match="scales"):
        cpu_kernels.linear(x, packed, 1000, None)
    with pytest.raises(RuntimeError, match="columns"):
        cpu_kernels.linear(x[:, :500], packed, 1000, None, scales=padded)


def load_with_flags(monkeypatch, flags: str, isa: str = "avx512") -> cpu_kernels.KernelStatus:
    """`_load` as on a CPU with these flags, which pick the instruction set `isa` that this
    machine's kernels were built for (so they load from the cache: a build for another one
    would take minutes, and its library could not run here)."""
    if cpu_kernels.status().module is None:
        pytest.skip(cpu_kernels.status().reason)
    if cpu_kernels.status().isa != isa:
        pytest.skip(f"the kernels here are built for {cpu_kernels.status().isa}, not {isa}")
    monkeypatch.setattr(cpu_kernels, "cpu_info", lambda: parse_cpu_info(f"flags\t\t: {flags}\n"))
    return cpu_kernels._load()


AVX512 = "avx2 fma avx512f avx512bw avx512vl avx512dq"


def test_w8a8_needs_the_cpu_s_vnni_dot_products(monkeypatch):
    status = load_with_flags(monkeypatch, f"{AVX512} avx512_bf16")
    assert not status.w8a8 and "W8A8 not available: no AVX512-VNNI" in status.reason
    assert load_with_flags(monkeypatch, f"{AVX512} avx512_bf16 avx512_vnni").w8a8


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_linear_runs_on_it_where_it_can_and_says_so(dtype):
    needs_kernel(dtype)
    w, b = torch.randn(48, 32).to(dtype), torch.randn(48).to(dtype)
    linear = PackedLinear(w, b)
    assert linear.backend == "ours" and linear.kind() == f"PackedLinear[48x32+bias, {str(dtype)[6:]}, ours]"
    x = torch.randn(5, 32).to(dtype)
    assert torch.equal(linear(x), cpu_kernels.linear(x, linear.packed, 48, b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_packed_copy_is_the_only_one_and_gives_the_weight_back(dtype):
    needs_kernel(dtype)
    w, b = torch.randn(50, 37).to(dtype), torch.randn(50).to(dtype)  # padded to 64 outputs (and 38 inputs in bf16)
    linear = PackedLinear(w, b)
    assert linear.weight is None and [p.shape for p in linear.parameters()] == [b.shape]
    assert torch.equal(linear.dense_weight(), w) and linear.dense_weight().dtype == dtype
    rows = torch.tensor([0, 17, 49, 17])
    assert torch.equal(linear.weight_rows(rows), w[rows].float())
    assert linear.stored_bytes() == linear.packed.numel() * linear.packed.element_size() + b.numel() * b.element_size()


def test_without_the_kernel_packed_linear_keeps_onednn_and_the_log_says_why(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_status", cpu_kernels.KernelStatus(None, frozenset(), "off for this test"))
    w = torch.randn(48, 32)
    linear = PackedLinear(w, None)
    assert linear.backend in ("onednn", "torch") and "ours" not in linear.kind()
    x = torch.randn(3, 32)
    torch.testing.assert_close(linear(x), x @ w.T)


def test_it_is_not_built_where_the_cpu_or_the_switch_says_no(monkeypatch):
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
    monkeypatch.setattr(cpu_kernels, "cpu_info", lambda: parse_cpu_info("flags\t\t: fpu sse2 avx2 f16c\n"))
    status = cpu_kernels._load()
    assert status.module is None and not status.dtypes and "fma" in status.reason and status.isa == ""
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    status = cpu_kernels._load()
    assert status.module is None and "ESP_SERVE_CPU_KERNEL=0" in status.reason


def test_bf16_needs_the_cpu_s_bf16_dot_products(monkeypatch):
    status = load_with_flags(monkeypatch, AVX512)
    assert status.dtypes == {torch.float32} and "no avx512_bf16" in status.reason


def test_without_avx512_they_are_built_for_avx2_with_float32_linears_and_no_w8a8(monkeypatch):
    status = load_with_flags(monkeypatch, "avx2 fma f16c avx_vnni", isa="avx2")
    assert status.module is not None and status.isa == "avx2" and "ours (avx2)" in status.reason
    assert status.dtypes == {torch.float32} and not status.w8a8 and "W8A8 not available" in status.reason


def test_bf16_linears_stay_on_onednn_where_amx_makes_blocks_cheap(monkeypatch):
    status = load_with_flags(monkeypatch, f"{AVX512} avx512_bf16 amx_bf16 amx_tile")
    assert status.dtypes == {torch.float32} and "AMX" in status.reason and status.module is not None


def _reference_attention(q, keys, values, visible, scale):
    group = q.shape[1] // keys.shape[0]
    k, v = (t.double().repeat_interleave(group, 0) for t in (keys, values))
    scores = torch.einsum("rhd,hld->rhl", q.double(), k) * scale
    if visible is not None:
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.einsum("rhl,hld->rhd", torch.softmax(scores, -1), v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (14, 2, 64), (4, 4, 128), (2, 1, 16)])
def test_attention_is_attention_and_a_row_alone_over_its_keys_gets_its_bits(dtype, heads, kv_heads, head_dim):
    if not cpu_kernels.supports_attention(dtype, head_dim):
        pytest.skip(cpu_kernels.status().reason)
    gen = torch.Generator().manual_seed(head_dim)
    length, rows = 300, 12
    # keys and values as a cache hands them out: a run of a longer pool
    pool = torch.randn(2, kv_heads, length + 50, head_dim, generator=gen).to(dtype)
    keys, values = pool[0, :, :length], pool[1, :, :length]
    q = torch.randn(rows, heads, head_dim, generator=gen).to(dtype)
    visible = torch.ones(rows, length, dtype=torch.bool)
    visible[:, -rows:] = torch.rand(rows, rows, generator=gen) < 0.5
    visible[torch.arange(rows), length - rows + torch.arange(rows)] = True
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for mask in (visible, None):
        out = cpu_kernels.attention(q, keys, values, mask, head_dim**-0.5)
        assert out.dtype == dtype and out.shape == q.shape
        want = _reference_attention(q, keys, values, mask, head_dim**-0.5)
        torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    out = cpu_kernels.attention(q, keys, values, visible, head_dim**-0.5)
    for r in range(rows):
        own = visible[r].nonzero()[:, 0]
        alone = cpu_kernels.attention(q[r : r + 1], keys[:, own], values[:, own], None, head_dim**-0.5)
        assert torch.equal(alone[0], out[r]), r


def test_attention_refuses_what_it_cannot_take():
    if cpu_kernels.status().module is None:
        pytest.skip(cpu_kernels.status().reason)
    q, kv = torch.randn(2, 4, 24), torch.randn(2, 10, 24)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_kernels.attention(q, kv, kv, None, 0.2)
    q, kv = torch.randn(2, 4, 32), torch.randn(2, 10, 32)
    with pytest.raises(RuntimeError, match="visible"):
        cpu_kernels.attention(q, kv, kv, torch.ones(2, 9, dtype=torch.bool), 0.2)
    assert not cpu_kernels.supports_attention(torch.float16, 64) and not cpu_kernels.supports_attention(torch.float32, 72)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_silu_mul_compute_what_torch_does_row_by_row(dtype):
    if not cpu_kernels.supports_elementwise(dtype):
        pytest.skip(cpu_kernels.status().reason)
    gen = torch.Generator().manual_seed(5)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for width in (576, 896, 33, 16):  # 33: a row that ends inside a vector
        x = (torch.randn(37, width, generator=gen) * 3).to(dtype)
        w = torch.randn(width, generator=gen).to(dtype)
        got = cpu_kernels.rms_norm(x, w, 1e-5)
        want = torch.nn.functional.rms_norm(x.double(), (width,), w.double(), 1e-5)
        torch.testing.assert_close(got.double(), want, atol=tol * 4, rtol=tol)
        assert torch.equal(torch.cat([cpu_kernels.rms_norm(x[i : i + 1], w, 1e-5) for i in range(37)]), got)
    for inter in (1536, 24, 7):
        wide = (torch.randn(9, 2 * inter + 8, generator=gen) * 4).to(dtype)
        gate_up = wide[:, : 2 * inter]  # a view whose rows are not contiguous with each other
        got = cpu_kernels.silu_mul(gate_up)
        want = torch.nn.functional.silu(gate_up[:, :inter].double()) * gate_up[:, inter:].double()
        torch.testing.assert_close(got.double(), want, atol=tol * 4, rtol=tol * 4)
        assert torch.equal(torch.cat([cpu_kernels.silu_mul(gate_up[i : i + 1]) for i in range(9)]), got)
