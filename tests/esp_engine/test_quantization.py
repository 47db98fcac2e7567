"""Weight-only int8/int4 quantization (esp_engine/quantization.py) on the embedded SmolLM2.

Lossless here means: with the same quantized weights, every speculative method's greedy output
equals plain greedy decoding token for token (float32 activations). That holds because each
quantized kernel gives a row the same result whatever the call's row count, checked directly
for 1 to 130 rows. Quantized output stays close to the unquantized model's, and combinations
the kernels do not take are refused before any weight is read.

On x86 the kernels are vectorized only for bfloat16; float32 runs their scalar loops, so these
tests keep generations short and the engine reuses prompt prefixes.
"""

import copy
import dataclasses

import pytest
import torch
from torch import nn

import esp_engine.quantization as quantization
from esp_engine.config import SamplingParams, SpecConfig, preset_names
from esp_engine.engine import LLMEngine
from esp_engine.errors import ModelLoadError
from esp_engine.kv_cache import KVCache
from esp_engine.loader import load_model
from esp_engine.model import PackedLinear
from esp_engine import cpu_kernels
from esp_engine.quantization import (Int4Linear, Int8Linear, W8A8Linear, check_supported, quantize_lm_head_by_default,
                                     quantize_model)
from esp_engine.scheduler import SchedulerConfig
from tests.conftest import chat_ids, random_llama

PROMPT = "Count from 1 to 30, separated by commas."
SPEC_METHODS = ("esp", "pld", "lade", "hybrid")
KERNEL_ROWS = 130


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here: the float32 kernels are scalar loops and the small model's matmuls
    tiny, and on a shared 2-core machine a 2-thread call waits for a core the other jobs hold (a
    pass measured 40x slower than with 1 thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _quantized_copy(loaded, method: str, lm_head: bool | None = False):
    """`loaded` with its linears quantized, in a copy of the module tree (the session's model and
    its tensors stay as they are; quantize_model reads the dense weights and builds new modules)."""
    model = copy.copy(loaded.model)
    model._modules = dict(model._modules)
    layers = []
    for layer in loaded.model.layers:
        layer = copy.copy(layer)
        layer._modules = dict(layer._modules)
        layers.append(layer)
    model.layers = nn.ModuleList(layers)
    report = quantize_model(model, method, lm_head=lm_head)
    return dataclasses.replace(loaded, model=model, quantization=method), report


@pytest.fixture(scope="module")
def smol_int8(smol):
    return _quantized_copy(smol, "int8")


@pytest.fixture(scope="module")
def smol_int4(smol):
    return _quantized_copy(smol, "int4")


def _engine(loaded) -> LLMEngine:
    # Prefix caching: every method's request reuses the prompt's KV instead of prefilling it again.
    return LLMEngine(loaded, scheduler_config=SchedulerConfig(enable_prefix_caching=True))


def test_every_layer_linear_is_replaced_and_the_head_kept(smol_int8, smol_int4):
    for (loaded, report), layer_cls in ((smol_int8, Int8Linear), (smol_int4, Int4Linear)):
        model = loaded.model
        assert len(report.quantized) == 4 * len(model.layers) and not report.kept
        for layer in model.layers:
            assert all(type(getattr(layer, n)) is layer_cls for n in ("wqkv", "wo", "w_gate_up", "w_down"))
        assert type(model.lm_head) is PackedLinear
        assert type(model.embed_tokens) is torch.nn.Embedding and model.embed_tokens.weight.dtype == torch.float32
        assert report.bytes_after < report.bytes_before / 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear], ids=["int8", "int4"])
def test_kernel_gives_a_row_the_same_result_for_1_to_130_rows(smol, cls, dtype):
    dense = smol.model.layers[0].wo  # a real 576x576 weight
    linear = cls(dense.dense_weight(), None, dtype)
    assert isinstance(linear, PackedLinear)
    x = torch.randn(KERNEL_ROWS, dense.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.inference_mode():
        alone = torch.cat([linear(x[i : i + 1]) for i in range(KERNEL_ROWS)])
        variant = [m for m in range(1, KERNEL_ROWS + 1) if not torch.equal(linear(x[:m]), alone[:m])]
    assert variant == []


def test_int8_weights_are_within_half_a_step(smol):
    dense = smol.model.layers[0].w_down.dense_weight()
    linear = Int8Linear(dense, None, torch.float32)
    err = (linear.dequantize() - dense).abs().amax(dim=1)
    assert torch.all(err <= linear.scales / 2 * (1 + 1e-5))
    rows = torch.tensor([3, 0, 17])
    assert torch.equal(linear.weight_rows(rows), linear.dequantize()[rows])


def test_int4_weights_are_within_half_a_step_of_their_group(smol):
    dense = smol.model.layers[0].wqkv.dense_weight()[:128]
    linear = Int4Linear(dense, None, torch.float32)
    err = (linear.dequantize() - dense).abs().reshape(128, -1, linear.group_size).amax(dim=-1)
    assert torch.all(err <= linear.scales_and_zeros[..., 0].T / 2 * (1 + 1e-5) + 1e-7)


def test_int4_packing_in_chunks_equals_packing_at_once(monkeypatch):
    w = torch.randn(320, 64, generator=torch.Generator().manual_seed(1))
    whole = Int4Linear(w, None, torch.bfloat16)
    monkeypatch.setattr(quantization, "_CHUNK_ROWS", 128)
    chunked = Int4Linear(w, None, torch.bfloat16)
    assert torch.equal(whole.weight, chunked.weight) and torch.equal(whole.scales_and_zeros, chunked.scales_and_zeros)


def test_bias_and_activation_dtype():
    w, b = torch.randn(32, 64), torch.randn(32)
    x = torch.randn(5, 64)
    for cls in (Int8Linear, Int4Linear):
        linear = cls(w, b, torch.float32)
        assert torch.allclose(linear(x), x @ linear.dequantize().T + b, atol=1e-4)
        with pytest.raises(TypeError, match="computes in torch.float32"):
            linear(x.bfloat16())


def _prompt_logits(loaded, text: str) -> torch.Tensor:
    m, s = loaded.model, loaded.model.shape
    ids = loaded.tokenizer(text)["input_ids"]
    cache = KVCache.standalone(s.num_layers, s.num_kv_heads, s.head_dim, len(ids), m.dtype, m.device)
    return m.logits(m(cache, m.embed(torch.tensor(ids)), torch.arange(len(ids)), None))


@pytest.mark.parametrize("which", ["int8", "int4"])
def test_quantized_logits_stay_close_to_the_unquantized_model(smol, smol_int8, smol_int4, which):
    # Measured: int8's logit rows correlate 0.9985 at worst with the unquantized model's over these
    # 15 positions, top-1 equal at 14 (the other a near-tie); int4's are equal to within summation
    # order (next test).
    quantized = {"int8": smol_int8, "int4": smol_int4}[which][0]
    text = "The sky is blue because sunlight is scattered by the air, and blue light"
    ref, got = _prompt_logits(smol, text), _prompt_logits(quantized, text)
    corr = torch.stack([torch.corrcoef(torch.stack([r, g]))[0, 1] for r, g in zip(ref, got)])
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean()
    in_top5 = all(r.argmax() in g.topk(5).indices for r, g in zip(ref, got))
    assert corr.min() > {"int8": 0.995, "int4": 0.99999}[which] and top1 >= 0.9 and in_top5, (corr.min(), top1)


def test_int4_reproduces_the_embedded_models_q4_1_weights(smol):
    # The embedded GGUF is Q4_1: 4-bit codes with a scale and a minimum per 32 weights. int4's
    # asymmetric groups of 32 find the same grid, so the float32 weights come back bit for bit.
    dense = smol.model.layers[3].wo.dense_weight()
    assert torch.equal(Int4Linear(dense, None, torch.float32).dequantize(), dense)


def _check_lossless(engine, prompt_ids, spec, max_new_tokens, ref=None):
    params = SamplingParams(max_new_tokens=max_new_tokens)
    ref = ref or engine.generate(prompt_ids, params, SpecConfig(method="ar"))
    result = engine.generate(prompt_ids, params, spec)
    assert result.output_ids == ref.output_ids and result.finish_reason == ref.finish_reason, spec
    return result


def test_smollm2_int8_greedy_output_equals_plain_decoding(smol_int8):
    # Raw text (no chat template): a short prompt, whose continuation every drafter can guess;
    # hybrid, the server's default, drafts with both ESP masks and PLD chains. (int4 on SmolLM2
    # costs twice as much in float32, so its end-to-end check is the small model's below; its
    # kernel's row invariance is checked on SmolLM2's weights above.)
    loaded = smol_int8[0]
    ids = loaded.tokenizer("Counting: 1, 2, 3, 4, 5,")["input_ids"]
    result = _check_lossless(_engine(loaded), ids, SpecConfig.from_preset("hybrid", "bc10"), 12)
    assert result.num_decode_tokens > result.num_decode_calls, "no drafted token was accepted"


TINY_CONFIGS = [(m, p) for m in SPEC_METHODS for p in preset_names(m)]


@pytest.fixture(scope="module")
def tiny_quantized():
    # 64 tokens wide: conftest's `tiny` has 16, narrower than the bc60 trees.
    tiny = random_llama(vocab_size=64, hidden_size=64, intermediate_size=128, name="tiny64")
    return {"int8": _quantized_copy(tiny, "int8")[0], "int4": _quantized_copy(tiny, "int4")[0],
            "int8-head": _quantized_copy(tiny, "int8", lm_head=True)[0]}


@pytest.mark.parametrize("quant", ["int8", "int4", "int8-head"])
def test_every_method_and_preset_equals_plain_decoding_on_a_small_random_model(tiny_quantized, quant):
    # Every method at every preset: blocks of up to 60 rows, on a model fast enough for all of them.
    loaded = tiny_quantized[quant]
    assert type(loaded.model.layers[0].wqkv) is {"int8": Int8Linear, "int4": Int4Linear, "int8-head": Int8Linear}[quant]
    assert (type(loaded.model.lm_head) is Int8Linear) == (quant == "int8-head")
    _check_every_method_and_preset(loaded)


def _check_every_method_and_preset(loaded) -> None:
    engine = _engine(loaded)
    prompts = [[5 * i + j % 4 for j in range(12)] for i in range(3)]  # repeats, for PLD to find
    refs = [engine.generate(ids, SamplingParams(max_new_tokens=24), SpecConfig(method="ar")) for ids in prompts]
    for method, preset in TINY_CONFIGS:
        accepted = calls = 0
        for ids, ref in zip(prompts, refs):
            result = _check_lossless(engine, ids, SpecConfig.from_preset(method, preset), 24, ref)
            accepted += result.num_decode_tokens
            calls += result.num_decode_calls
        assert accepted > calls, f"{method}:{preset} never accepted a drafted token"


def needs_w8a8(dtype=torch.float32):
    if not cpu_kernels.supports_w8a8(dtype):
        pytest.skip(f"no W8A8 kernel here: {cpu_kernels.status().reason}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_w8a8_gives_a_row_the_same_result_for_1_to_130_rows_and_stays_near_int8(smol, dtype):
    needs_w8a8(dtype)
    dense = smol.model.layers[0].w_down  # a real 576x1536 weight
    linear, int8 = W8A8Linear(dense.dense_weight(), None, dtype), Int8Linear(dense.dense_weight(), None, dtype)
    assert torch.equal(linear.stored_weight(), int8.stored_weight()) and torch.equal(linear.scales, int8.scales)
    assert linear.weight is None and linear.stored_weight().dtype == torch.int8
    rows = torch.tensor([3, 0, 575])
    assert torch.equal(linear.weight_rows(rows), int8.dequantize()[rows])
    assert linear.kind() == f"W8A8Linear[576x1536, w8a8 g32, {str(dtype)[6:]}, ours]"
    x = torch.randn(KERNEL_ROWS, dense.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.inference_mode():
        alone = torch.cat([linear(x[i : i + 1]) for i in range(KERNEL_ROWS)])
        variant = [m for m in range(1, KERNEL_ROWS + 1) if not torch.equal(linear(x[:m]), alone[:m])]
        want = int8(x).float()
    assert variant == []
    # Rounding each activation to one of 255 steps of its group's range: about 0.3% of a row's norm.
    error = (alone.float() - want).norm(dim=-1) / want.norm(dim=-1)
    assert error.max() < 0.02, error.max()


def test_w8a8_quantizes_the_head_too_and_every_method_equals_plain_decoding(smol):
    # Lossless for W8A8 is the same rule: with the same quantization, every method's greedy output
    # is plain greedy decoding's. Activations are quantized per row, so rows beside a row never
    # change its result; this is checked end to end on the tiny model and on SmolLM2.
    needs_w8a8()
    tiny = random_llama(vocab_size=64, hidden_size=64, intermediate_size=128, name="tiny64")
    loaded, report = _quantized_copy(tiny, "w8a8", lm_head=None)
    assert "lm_head" in report.quantized and type(loaded.model.lm_head) is W8A8Linear
    assert type(loaded.model.layers[0].w_down) is W8A8Linear
    _check_every_method_and_preset(loaded)
    smol_w8a8 = _quantized_copy(smol, "w8a8", lm_head=None)[0]
    ids = smol_w8a8.tokenizer("Counting: 1, 2, 3, 4, 5,")["input_ids"]
    result = _check_lossless(_engine(smol_w8a8), ids, SpecConfig.from_preset("hybrid", "bc10"), 12)
    assert result.num_decode_tokens > result.num_decode_calls, "no drafted token was accepted"


def test_w8a8_is_refused_where_the_cpu_has_no_vnni(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_status", cpu_kernels.KernelStatus(None, frozenset(), "no kernels for this test"))
    with pytest.raises(ModelLoadError, match="AVX512-VNNI.*no kernels for this test.*use --quantization int8"):
        check_supported("w8a8", "cpu", torch.bfloat16)
    with pytest.raises(ModelLoadError, match="AVX512-VNNI"):
        W8A8Linear(torch.randn(16, 32), None, torch.float32)


def test_load_model_quantizes_and_reports(smol, tmp_path, monkeypatch):
    # A small random model saved as a Hugging Face directory, with SmolLM2's tokenizer: load_model's
    # whole path (bf16 weights, quantization, the row-invariance probe) in a second or two.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smol.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    smol.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu", dtype="bfloat16", quantization="int4")
    assert loaded.quantization == "int4" and loaded.dtype == torch.bfloat16
    head = Int8Linear if quantize_lm_head_by_default(torch.bfloat16) else PackedLinear
    assert type(loaded.model.layers[0].w_gate_up) is Int4Linear and type(loaded.model.lm_head) is head
    out = _engine(loaded).generate(chat_ids(loaded.tokenizer, PROMPT), SamplingParams(max_new_tokens=4),
                                   SpecConfig(method="ar"))
    assert out.num_decode_calls == 3
    assert smol.quantization == "none"
    # An int8 head in bf16 gives float32 logits: our kernel's float32 sums where it runs, else the
    # near-top logits summed again in float32 from its dequantized rows.
    model = loaded.model
    model.lm_head = Int8Linear(model.embed_tokens.weight.data, None, torch.bfloat16)
    hidden = torch.randn(3, config.hidden_size, generator=torch.Generator().manual_seed(2)).bfloat16()
    exact = hidden.float() @ model.lm_head.dequantize().T
    if cpu_kernels.supports_linear(torch.bfloat16):
        torch.testing.assert_close(model.logits(hidden), exact, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(model.lm_head, "float_out", lambda x: None)
    logits = model.logits(hidden)
    top = logits.argmax(-1)
    assert torch.equal(logits[torch.arange(3), top], exact[torch.arange(3), top])


@pytest.mark.parametrize("method, device, dtype, message", [
    ("int3", "cpu", torch.float32, "unknown quantization 'int3'; choose one of none, int8, int4, w8a8"),
    ("w8a8", "cpu", torch.float16, "w8a8 runs on our CPU kernels with AVX512-VNNI, in float32 or bfloat16"),
    ("int4", "cuda", torch.bfloat16, "runs on CPU only"),
    ("int8", "cuda:1", torch.float16, "runs on CPU only"),
    ("int8", "cpu", torch.float64, "needs float32, bfloat16 or float16 activations"),
])
def test_unsupported_combinations_are_refused(method, device, dtype, message):
    with pytest.raises(ModelLoadError, match=message):
        check_supported(method, device, dtype)


def test_load_model_refuses_before_reading_weights(monkeypatch):
    import esp_engine.loader as loader

    monkeypatch.setattr(loader, "resolve_model_dir", lambda *_: pytest.fail("weights were looked for"))
    with pytest.raises(ModelLoadError, match="unknown quantization"):
        load_model("smollm2-135m-instruct", device="cpu", quantization="int2")


def test_shapes_the_kernels_cannot_take_stay_dense(tiny_shapes_model):
    # hidden 48: int4 needs K divisible by 32, so only w_down (K 64) is int4; the int8 head takes K 48.
    report = quantize_model(tiny_shapes_model, "int4", lm_head=True)
    assert report.quantized == ("layers.0.w_down", "layers.1.w_down", "lm_head")
    assert [k.split()[0] for k in report.kept] == [f"layers.{i}.{n}" for i in (0, 1) for n in ("wqkv", "wo", "w_gate_up")]
    assert type(tiny_shapes_model.layers[0].wo) is PackedLinear
    assert quantize_model(tiny_shapes_model, "none").quantized == ()
    with pytest.raises(ModelLoadError, match="quantized already"):
        quantize_model(tiny_shapes_model, "int8")
    assert type(tiny_shapes_model.layers[0].wo) is PackedLinear  # refused before changing anything


@pytest.fixture
def tiny_shapes_model():
    return random_llama(vocab_size=64, hidden_size=48, intermediate_size=64).model


def test_the_flag_reaches_the_server_and_the_benchmark(monkeypatch):
    import argparse
    import threading

    from fastapi.testclient import TestClient

    from esp_bench.engine_bench import add_arguments
    from server import app as server_app
    from server.__main__ import parse_args

    assert parse_args([]).quantization == "none" and parse_args(["--quantization", "int4"]).quantization == "int4"
    with pytest.raises(SystemExit):
        parse_args(["--quantization", "int3"])
    bench = argparse.ArgumentParser()
    add_arguments(bench)
    assert bench.parse_args(["--prompts", "q.jsonl", "--quantization", "int8"]).quantization == "int8"
    seen, done = {}, threading.Event()

    def fake_load_model(*args, **kwargs):
        seen.update(kwargs)
        raise ModelLoadError("stop here")

    monkeypatch.setattr(server_app, "load_model", fake_load_model)
    app = server_app.build_app(server_app.ServerSettings(quantization="int8"), on_error=lambda exc: done.set())
    with TestClient(app):
        assert done.wait(10)
    assert seen["quantization"] == "int8"
