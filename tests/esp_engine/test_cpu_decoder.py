"""The C++ pass (`cpu_kernels.CpuDecoder`) computes exactly what the model's op-by-op pass
computes, bit for bit, in every dtype, for batches of sequences with tree masks; the model uses
it only where every part of every layer runs on our kernels."""

import pytest
import torch

from esp_engine import cpu_kernels
from esp_engine.kv_cache import KVCache
from esp_engine.model import LlamaFamilyModel
from esp_engine.quantization import quantize_model
from tests.conftest import random_architecture

DTYPES = [torch.float32, torch.bfloat16]


def tiny(architecture: str, dtype: torch.dtype, head_dim: int = 32) -> LlamaFamilyModel:
    hf = random_architecture(architecture, hidden_size=96, intermediate_size=160, num_attention_heads=6,
                             head_dim=head_dim, max_position_embeddings=128)
    return LlamaFamilyModel(hf.to(dtype))


def needs_decoder(model: LlamaFamilyModel) -> None:
    if not cpu_kernels.supports_linear(model.dtype):
        pytest.skip(f"no kernels for {model.dtype} here: {cpu_kernels.status().reason}")
    assert model.cpu_decoder() is not None


def passes(model: LlamaFamilyModel, use_decoder: bool) -> list[torch.Tensor]:
    """Prefills, a batched pass of a tree block beside a plain row, a decode step: every hidden
    state and every cached key and value they leave."""
    model.use_cpu_decoder = use_decoder
    s = model.shape
    caches = [KVCache.standalone(s.num_layers, s.num_kv_heads, s.head_dim, 64, model.dtype) for _ in range(2)]
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(1))
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    out = [model(caches[0], model.embed(ids[:9]), torch.arange(9), None),
           model(caches[1], model.embed(ids[9:14]), torch.arange(5), None),
           model.forward_batch(caches, model.embed(ids[14:19]), torch.tensor([9, 10, 10, 11, 5]), [tree, None], [4, 1]),
           model(caches[1], model.embed(ids[19:20]), torch.tensor([6]), None)]
    return out + [c.keys[:, :, : c.length] for c in caches] + [c.values[:, :, : c.length] for c in caches]


@pytest.mark.parametrize("quantization", ["none", "int8", "w8a8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_it_gives_the_bits_of_the_op_by_op_pass(architecture, dtype, quantization):
    if quantization == "w8a8" and not cpu_kernels.supports_w8a8(dtype):
        pytest.skip(f"no W8A8 kernel here: {cpu_kernels.status().reason}")
    model = tiny(architecture, dtype)
    quantize_model(model, quantization)
    needs_decoder(model)
    fused, op_by_op = passes(model, True), passes(model, False)
    for i, (a, b) in enumerate(zip(fused, op_by_op)):
        assert a.dtype == dtype and torch.equal(a, b), i


def test_the_model_runs_op_by_op_where_a_layer_is_off_the_kernels():
    model = tiny("llama", torch.float32)
    needs_decoder(model)
    model.use_cpu_decoder = False
    assert model.cpu_decoder() is None
    quantized = tiny("llama", torch.float32)
    assert quantized.cpu_decoder() is not None
    quantize_model(quantized, "int4")
    assert quantized.cpu_decoder() is None  # int4 runs torch's kernel
    assert tiny("qwen3", torch.float32).cpu_decoder() is None  # per-head q/k norms
    assert tiny("llama", torch.float32, head_dim=16).cpu_decoder() is None  # RoPE halves of 16 lanes


def test_a_position_outside_the_rope_table_is_an_error_not_a_crash():
    model = tiny("llama", torch.float32)
    needs_decoder(model)
    cache = KVCache.standalone(2, 2, 32, 8, torch.float32)
    with pytest.raises(RuntimeError, match="outside the RoPE table"):
        model(cache, model.embed(torch.tensor([3])), torch.tensor([128]), None)
