"""Attention of a pass: below float32 on a CPU, a row gets the same bits in any call.

Speculation is identical to plain decoding only if a token verified inside a block of tree rows
gets exactly the hidden state plain decoding gives it alone. In a block a node's ancestors are
interleaved with masked siblings and the call holds many rows; alone, its call holds one row
and exactly its keys.
"""

import pytest
import torch
import torch.nn.functional as F

from esp_engine import cpu_kernels
from esp_engine.attention import InvariantAttention
from esp_engine.kv_cache import KVCache

HEAD_DIM, SCALE = 64, 0.125
SHAPES = {"SmolLM2": (9, 3), "Qwen2.5-0.5B": (14, 2)}  # query heads, key heads


@pytest.fixture(params=["torch ops", "our kernel"])
def use_kernel(request) -> bool:
    """Both ways InvariantAttention computes: torch ops (float64 sums), and our CPU kernel."""
    if request.param == "our kernel" and not cpu_kernels.supports_attention(torch.bfloat16, HEAD_DIM):
        pytest.skip(f"no CPU kernels here: {cpu_kernels.status().reason}")
    return request.param == "our kernel"


def random_tree(num_nodes: int, gen: torch.Generator) -> torch.Tensor:
    """[N, N] ancestor-or-self mask of a random tree whose nodes follow their parents."""
    sees = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    for i in range(num_nodes):
        parent = int(torch.randint(-1, i, (), generator=gen)) if i else -1
        if parent >= 0:
            sees[i] = sees[parent]
        sees[i, i] = True
    return sees


def attend(q, keys, values, visible, use_kernel):
    heads, kv_heads = q.shape[1], keys.shape[0]
    return InvariantAttention(visible, q.shape[0], keys.shape[1], heads, kv_heads, HEAD_DIM, q.device, q.dtype,
                              use_kernel=use_kernel)(q, keys, values, SCALE)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_tree_row_gets_the_same_bits_as_alone_over_its_own_keys(shape, use_kernel):
    heads, kv_heads = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    for context, nodes in ((37, 4), (256, 10), (700, 30), (1500, 60), (100, 90)):
        keys, values = (torch.randn(kv_heads, context + nodes, HEAD_DIM, generator=gen).bfloat16() for _ in "kv")
        q = torch.randn(nodes, heads, HEAD_DIM, generator=gen).bfloat16()
        tree = random_tree(nodes, gen)
        block = attend(q, keys, values, torch.cat([torch.ones(nodes, context, dtype=torch.bool), tree], dim=1),
                       use_kernel)
        for i in range(nodes):
            own = torch.cat([torch.arange(context), context + tree[i].nonzero()[:, 0]])
            alone = attend(q[i : i + 1], keys[:, own], values[:, own], None, use_kernel)
            assert torch.equal(alone[0], block[i]), (context, nodes, i)


@pytest.mark.parametrize("visible", ["causal", "tree", "everything"])
def test_it_is_attention(visible, use_kernel):
    """Within bf16 rounding of a float64 reference, including prefills longer than one chunk and
    masks under which rows see later rows."""
    heads, kv_heads = SHAPES["SmolLM2"]
    gen = torch.Generator().manual_seed(1)
    for context, rows in ((0, 1), (50, 1), (0, 150), (30, 150), (200, 10)):
        length = context + rows
        keys, values = (torch.randn(kv_heads, length, HEAD_DIM, generator=gen).bfloat16() for _ in "kv")
        q = torch.randn(rows, heads, HEAD_DIM, generator=gen).bfloat16()
        block = {"causal": torch.ones(rows, rows, dtype=torch.bool).tril(), "tree": random_tree(rows, gen),
                 "everything": torch.ones(rows, rows, dtype=torch.bool)}[visible]
        mask = torch.cat([torch.ones(rows, context, dtype=torch.bool), block], dim=1)
        reference = F.scaled_dot_product_attention(
            q.double().transpose(0, 1)[None], keys.double()[None], values.double()[None], attn_mask=mask,
            scale=SCALE, enable_gqa=True)[0].transpose(0, 1)
        out = attend(q, keys, values, mask, use_kernel)
        assert out.dtype == torch.bfloat16 and out.shape == q.shape
        torch.testing.assert_close(out.double(), reference, atol=2e-2, rtol=1e-2)


def test_bf16_tokens_computed_together_equal_tokens_decoded_one_by_one(smol_bf16):
    """The whole model: 60 tokens in one pass give the hidden states of a prefill of 50 and ten
    one-row passes, bit for bit (with SDPA they differed by 0.1-0.4)."""
    model, shape = smol_bf16.model, smol_bf16.model.shape
    ids = torch.tensor(smol_bf16.tokenizer("The quick brown fox jumps over the lazy dog. " * 6).input_ids[:60])

    def cache():
        return KVCache.standalone(shape.num_layers, shape.num_kv_heads, shape.head_dim, 128, model.dtype, "cpu")

    together = model.forward(cache(), model.embed(ids), torch.arange(60), None)
    c = cache()
    one_by_one = [model.forward(c, model.embed(ids[:50]), torch.arange(50), None)]
    for i in range(50, 60):
        one_by_one.append(model.forward(c, model.embed(ids[i : i + 1]), torch.tensor([i]), None))
    assert torch.equal(together, torch.cat(one_by_one))
