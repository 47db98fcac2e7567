"""The engine's own forward pass (fused projections, packed linears, fused RMSNorm, its KV cache)
computes what transformers computes for the same checkpoint."""

import pytest
import torch

from esp_engine.config import SamplingParams, SpecConfig
from esp_engine.kv_cache import KVCache
from tests.conftest import chat_ids, random_architecture


@pytest.fixture(scope="module")
def hf_smol(smol):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smol.source, dtype=torch.float32).eval()


def _logits(loaded, ids: list[int]) -> torch.Tensor:
    m, s = loaded.model, loaded.model.shape
    cache = KVCache.standalone(s.num_layers, s.num_kv_heads, s.head_dim, len(ids) + 8, m.dtype, m.device)
    half = len(ids) // 2  # two calls: the second attends to the cache the first wrote
    first = m(cache, m.embed(torch.tensor(ids[:half])), torch.arange(half), None)
    second = m(cache, m.embed(torch.tensor(ids[half:])), torch.arange(half, len(ids)), None)
    return m.logits(torch.cat([first, second]))


def test_logits_match_transformers(smol, hf_smol):
    ids = chat_ids(smol.tokenizer, "Name three rivers in Europe and say which is longest.")
    with torch.inference_mode():
        theirs = hf_smol(torch.tensor([ids])).logits[0].float()
    ours = _logits(smol, ids)
    assert torch.allclose(ours, theirs, atol=2e-3, rtol=0), (ours - theirs).abs().max()


def test_greedy_output_matches_transformers_generate(smol, smol_engine, hf_smol):
    for text in ["What is the capital of Italy?", "Write a haiku about snow.", "List three prime numbers."]:
        ids = chat_ids(smol.tokenizer, text)
        with torch.inference_mode():
            out = hf_smol.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   do_sample=False, max_new_tokens=16, eos_token_id=None, pad_token_id=0,
                                   temperature=None, top_p=None, top_k=None)
        theirs = out[0, len(ids):].tolist()
        ours = smol_engine.generate(ids, SamplingParams(max_new_tokens=16, ignore_eos=True), SpecConfig(method="ar"))
        assert ours.output_ids == theirs


@pytest.mark.parametrize("head", ["float32 sums from the kernel", "near-top logits summed again"])
def test_bf16_logits_choose_what_float32_sums_would_and_the_same_in_any_call(smol_bf16, head, monkeypatch):
    """Below float32 a head's rounded logits tie often. Our CPU kernel gives the float32 sums;
    other heads' near-top logits are summed again in float32. Either way the greedy choice is the
    float32 one and a row's logits do not depend on its call."""
    model = smol_bf16.model
    if head != "float32 sums from the kernel":
        monkeypatch.setattr(model.lm_head, "float_out", lambda x: None)
    elif model.lm_head.float_out(torch.zeros(1, model.shape.hidden_size, dtype=torch.bfloat16)) is None:
        pytest.skip("the LM head is not on our CPU kernel here")
    hidden = torch.randn(40, model.shape.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    logits = model.logits(hidden)
    exact = hidden.float() @ model.lm_head.dense_weight().float().T
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    assert torch.equal(torch.cat([model.logits(hidden[i : i + 1]) for i in range(40)]), logits)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("head_dim", [16, 32])  # 32: where the CPU kernels run, in one C++ pass
@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
def test_every_architecture_computes_what_transformers_does(architecture, head_dim):
    """Qwen2's q/k/v biases and Qwen3's per-head q/k norms go through the same fused pass."""
    from esp_engine.model import LlamaFamilyModel

    hf = random_architecture(architecture, head_dim=head_dim)
    assert (architecture == "qwen2") == (hf.model.layers[0].self_attn.q_proj.bias is not None)
    ours = LlamaFamilyModel(hf)
    ids = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(1))
    cache = KVCache.standalone(2, 2, head_dim, 16, torch.float32, "cpu")
    hidden = torch.cat([ours(cache, ours.embed(ids[:7]), torch.arange(7), None),
                        ours(cache, ours.embed(ids[7:]), torch.arange(7, 12), None)])
    with torch.inference_mode():
        theirs = hf(ids[None]).logits[0]
    torch.testing.assert_close(ours.logits(hidden), theirs, atol=1e-4, rtol=1e-4)
