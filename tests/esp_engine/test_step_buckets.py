"""Padded decode passes in static buckets (esp_engine/step_buckets.py, padded_attention.py,
padded_runner.py): which bucket a step takes, how it is laid out, and that padding changes
nothing: a padded tree gives the tokens of the unpadded one, a padded batch gives each request
the tokens it gets alone. The batched attention backends (the GPU's) agree with the exact
per-sequence one up to rounding; on CUDA, a replayed graph gives what the eager pass gives."""

import pytest
import torch

from esp_engine.config import SamplingParams, SpecConfig
from esp_engine.engine import LLMEngine
from esp_engine.kv_cache import KVPool
from esp_engine.padded_runner import PaddedForward
from esp_engine.step_buckets import BlockRows, Bucket, BucketLadder, StepBuffers, take_scratch_slot
from esp_engine.tree import block_layout
from tests.conftest import chat_ids

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TEXTS = ["Write a short poem about the sea.", "List three uses of copper and say why.",
         "Translate 'the cat sleeps on the mat' into French and Spanish."]
MAX_NEW_TOKENS = 24


# ---- bucket choice -------------------------------------------------------------------------------
def test_a_step_takes_the_smallest_bucket_that_holds_its_batch_and_its_largest_block():
    ladder = BucketLadder()  # batch 1, 2, 4, ..., 64 x rows 1, 16, 32, 64
    assert ladder.choose([1]) == Bucket(1, 1)
    assert ladder.choose([1, 1, 1]) == Bucket(4, 1)
    assert ladder.choose([10]) == Bucket(1, 16)
    assert ladder.choose([30, 1, 5]) == Bucket(4, 32)
    assert ladder.choose([17] * 9) == Bucket(16, 32)
    assert ladder.choose([64] * 64) == Bucket(64, 64)
    assert Bucket(4, 32).num_rows == 128


def test_a_step_no_bucket_holds_gets_none():
    ladder = BucketLadder()
    assert ladder.choose([65]) is None  # a block larger than any bucket's rows
    assert ladder.choose([1] * 65) is None  # more sequences than the largest batch
    assert ladder.choose([]) is None


def test_the_ladder_is_configurable_and_lists_its_buckets_largest_first():
    ladder = BucketLadder(batch_sizes=(1, 8), rows=(1, 32))
    assert ladder.choose([2, 2]) == Bucket(8, 32)
    assert ladder.largest == Bucket(8, 32)
    assert ladder.buckets() == [Bucket(8, 32), Bucket(1, 32), Bucket(8, 1), Bucket(1, 1)]


@pytest.mark.parametrize("sizes", [(), (2, 1), (0, 1), (1, 1)])
def test_a_ladder_takes_distinct_positive_sizes_in_ascending_order(sizes):
    with pytest.raises(ValueError):
        BucketLadder(batch_sizes=sizes)


# ---- layout --------------------------------------------------------------------------------------
def test_a_padded_layout_puts_real_rows_first_and_sends_padding_to_the_scratch_slot(tiny):
    model = tiny.model
    shape = model.shape
    pool = KVPool(shape.num_layers, shape.num_kv_heads, shape.head_dim, 12, 16, model.dtype)
    a, b = pool.allocate(40), pool.allocate(40)
    a.length, b.length = 5, 9
    scratch = take_scratch_slot(pool)
    buffers = StepBuffers(Bucket(4, 16), shape.hidden_size, model.dtype, "cpu")
    tree = block_layout((0, 0, 1), 1)  # 4 tree rows and a mask each: 8 rows
    embeds_a, embeds_b = torch.randn(8, shape.hidden_size), torch.randn(1, shape.hidden_size)
    layout = buffers.lay_out(Bucket(2, 16), [BlockRows(a, embeds_a, tree.offsets + 5, tree.attn),
                                             BlockRows(b, embeds_b, torch.tensor([9]), None)], scratch)
    inputs = layout.inputs
    start_a, start_b = a.start_block * 16, b.start_block * 16
    assert inputs.embeds.shape == (32, shape.hidden_size)
    assert inputs.slot_mapping.tolist() == ([start_a + 5 + i for i in range(8)] + [scratch] * 8
                                            + [start_b + 9] + [scratch] * 15)
    assert inputs.positions.tolist() == (tree.offsets + 5).tolist() + [0] * 8 + [9] + [0] * 15
    assert inputs.is_real.tolist() == [True] * 8 + [False] * 8 + [True] + [False] * 15
    assert torch.equal(inputs.row_mask[0, :8, :8], tree.attn)
    assert not inputs.row_mask[0, :8, 8:].any()  # a real row never sees padding
    assert torch.equal(inputs.row_mask[0, 8:, 8:], torch.eye(8, dtype=torch.bool))  # padding sees itself alone
    assert not inputs.row_mask[0, 8:, :8].any()
    assert inputs.row_mask[1, 0].tolist() == [True] + [False] * 15
    assert inputs.ctx_lens.tolist() == [5, 9] and inputs.kv_starts.tolist() == [start_a, start_b]
    assert layout.real_rows.tolist() == list(range(8)) + [16]
    assert torch.equal(inputs.embeds[:8], embeds_a) and torch.equal(inputs.embeds[16], embeds_b[0])
    layout.finish()
    assert (a.length, b.length) == (13, 10)


def test_a_bucket_too_small_for_the_step_is_refused(tiny):
    shape = tiny.model.shape
    pool = KVPool(shape.num_layers, shape.num_kv_heads, shape.head_dim, 4, 16, tiny.model.dtype)
    cache = pool.allocate(16)
    buffers = StepBuffers(Bucket(2, 16), shape.hidden_size, tiny.model.dtype, "cpu")
    with pytest.raises(ValueError):
        buffers.lay_out(Bucket(1, 1), [BlockRows(cache, torch.zeros(2, shape.hidden_size), torch.arange(2), None)], 0)


# ---- the pass, on the real model -----------------------------------------------------------------
def _blocks_of_a_mixed_step(model, caches):
    """An ESP tree (rows under a tree mask), a plain decoding row, and a 5-row chain."""
    tree = block_layout((0, 0, 1, 2, 0), 1)
    shapes = [(tree.num_rows, tree.attn, tree.offsets), (1, None, torch.zeros(1, dtype=torch.long)),
              (5, None, torch.arange(5))]
    blocks = []
    for i, (cache, (n, attn, offsets)) in enumerate(zip(caches, shapes)):
        ids = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(i)).to(model.device)
        blocks.append(BlockRows(cache, model.embed(ids), offsets + cache.length, attn))
    return blocks


@pytest.fixture()
def mixed_step(smol):
    """Three sequences with 20, 27 and 34 cached tokens in a small pool of their own, and the
    hidden states the unpadded pass gives a mixed step over them."""
    model, shape = smol.model, smol.model.shape
    pool = KVPool(shape.num_layers, shape.num_kv_heads, shape.head_dim, 40, 16, model.dtype)
    # FlexAttention reads whole KV blocks, never-written slots too, where torch.empty may hold NaN
    # (0 * NaN reaches real rows). PaddedForward zeroes the free blocks; these caches take theirs
    # before it is built, so their unwritten slots are zeroed here, as the engine's order ensures.
    pool.keys.zero_()
    pool.values.zero_()
    caches = [pool.allocate(200) for _ in range(3)]
    for i, cache in enumerate(caches):
        n = 20 + 7 * i
        model.forward(cache, model.embed(torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(9 + i))),
                      torch.arange(n), None)
    lengths = [c.length for c in caches]
    blocks = _blocks_of_a_mixed_step(model, caches)
    unpadded = model.forward_batch(caches, torch.cat([b.embeds for b in blocks]), torch.cat([b.positions for b in blocks]),
                                   [b.attn for b in blocks], [b.embeds.shape[0] for b in blocks])
    for cache, n in zip(caches, lengths):
        cache.truncate(n)
    return model, pool, caches, lengths, unpadded


def test_a_padded_pass_gives_every_real_row_the_unpadded_hidden_state_bit_for_bit(mixed_step):
    model, pool, caches, lengths, unpadded = mixed_step
    forward = PaddedForward(model, pool, BucketLadder((1, 2, 4), (1, 16)))  # CPU: per-sequence attention, eager
    padded = forward.run(_blocks_of_a_mixed_step(model, caches))
    assert forward.last_key == (Bucket(4, 16), 0)  # 3 sequences of up to 12 rows: 64 rows, 46 of them padding
    assert torch.equal(padded, unpadded)
    assert [c.length for c in caches] == [n + r for n, r in zip(lengths, (12, 1, 5))]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["gathered", "flex"])
def test_the_batched_attention_backends_agree_with_per_sequence_attention_to_rounding(mixed_step, backend):
    """One call per layer for the whole batch changes reduction lengths, so rounding (fp32: a few
    1e-5 after 30 layers), never more."""
    model, pool, caches, lengths, unpadded = mixed_step
    forward = PaddedForward(model, pool, BucketLadder((1, 2, 4), (1, 16)), attention=backend)
    padded = forward.run(_blocks_of_a_mixed_step(model, caches))
    torch.testing.assert_close(padded, unpadded, rtol=1e-4, atol=2e-4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_compiled_flex_attention_gives_what_eager_flex_attention_gives_in_every_bucket():
    """The GPU compiles FlexAttention; on a CPU it compiles too (one mask function serves every
    bucket, the rows per sequence being data)."""
    from esp_engine.padded_attention import FlexBlockAttention, flex_mask_mod

    pool = KVPool(1, 2, 16, 24, 16, torch.float32)
    pool.keys.normal_(generator=torch.Generator().manual_seed(0))
    pool.values.normal_(generator=torch.Generator().manual_seed(1))
    scratch = take_scratch_slot(pool)
    buffers = StepBuffers(Bucket(4, 16), 16, torch.float32, "cpu")
    mask_mod = flex_mask_mod(buffers, scratch)
    caches = [pool.allocate(100) for _ in range(2)]
    for cache, n in zip(caches, (40, 77)):
        cache.length = n
    tree = block_layout((0, 0, 1), 1)
    for bucket in (Bucket(2, 16), Bucket(4, 16)):
        blocks = [BlockRows(caches[0], torch.randn(8, 16), tree.offsets + 40, tree.attn),
                  BlockRows(caches[1], torch.randn(1, 16), torch.tensor([77]), None)]
        layout = buffers.lay_out(bucket, blocks, scratch)
        q = torch.randn(bucket.num_rows, 4, 16)
        outs = []
        for compiled in (False, True):
            flex = FlexBlockAttention(pool, layout.inputs, scratch, mask_mod, compiled=compiled)
            flex.fill(layout)
            outs.append(flex.attend(0, q, 0.25))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_a_step_larger_than_every_bucket_is_left_to_the_unpadded_pass(mixed_step):
    model, pool, caches, _, _ = mixed_step
    forward = PaddedForward(model, pool, BucketLadder((1, 2), (1, 16)))
    assert forward.run(_blocks_of_a_mixed_step(model, caches)) is None  # three sequences, batches of two at most
    assert forward.run(_blocks_of_a_mixed_step(model, caches)[:2]) is not None


# ---- the engine ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def padded_engine(smol):
    return LLMEngine(smol, runner="padded")


@pytest.fixture(scope="module")
def prompts(smol):
    return [chat_ids(smol.tokenizer, t) for t in TEXTS]


CONFIGS = [("ar", None), ("esp", "bc10"), ("esp", "bc60"), ("hybrid", "bc30"), ("pld", "bc10"), ("lade", "bc10")]


@pytest.mark.parametrize("method, preset", CONFIGS, ids=[f"{m}-{p}" for m, p in CONFIGS])
def test_a_padded_tree_gives_the_tokens_of_the_unpadded_one(smol_engine, padded_engine, prompts, method, preset):
    spec, params = SpecConfig.from_preset(method, preset), SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    runner = padded_engine.runner
    before = runner.padded_passes
    for prompt in prompts:
        unpadded = smol_engine.generate(prompt, params, spec)
        padded = padded_engine.generate(prompt, params, spec)
        assert padded.output_ids == unpadded.output_ids
        assert (padded.num_decode_calls, padded.num_decode_tokens) == (unpadded.num_decode_calls,
                                                                        unpadded.num_decode_tokens)
    assert runner.padded_passes > before  # the decode steps did run padded


def test_a_padded_batch_gives_each_request_the_tokens_it_gets_alone(smol, smol_engine, padded_engine, prompts):
    """Five requests decode together (batch bucket 8: three sequences of padding) with methods of
    every block size; each gets what it gets alone, unpadded."""
    extra = [chat_ids(smol.tokenizer, t) for t in ("Name two planets.", "What is seven times eight?")]
    requests = list(zip(prompts + extra, [("esp", "bc30"), ("hybrid", "bc10"), ("ar", None), ("pld", "bc10"),
                                          ("esp", "bc10")]))
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
    alone = [smol_engine.generate(p, params, SpecConfig.from_preset(m, pr)).output_ids for p, (m, pr) in requests]
    ids = [padded_engine.add_request(p, params, SpecConfig.from_preset(m, pr)) for p, (m, pr) in requests]
    before = padded_engine.runner.padded_passes
    together: dict[str, list[int]] = {i: [] for i in ids}
    while padded_engine.has_unfinished():
        for out in padded_engine.step():
            together[out.req_id].extend(out.new_token_ids)
    assert [together[i] for i in ids] == alone
    assert padded_engine.runner.padded_passes > before


# ---- CUDA ----------------------------------------------------------------------------------------
def _cuda_tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    from esp_engine.model import LlamaFamilyModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    with torch.device("cuda"):
        return LlamaFamilyModel(LlamaForCausalLM(config).eval())


def _cuda_step(model, pool):
    pool.keys.zero_()  # slots a cache holds but never wrote sit in the KV blocks FlexAttention reads
    pool.values.zero_()
    caches = [pool.allocate(128) for _ in range(3)]
    for i, cache in enumerate(caches):
        n = 30 + 11 * i
        model.forward(cache, model.embed(torch.randint(0, 256, (n,), device="cuda")), torch.arange(n, device="cuda"),
                      None)
    return caches


@cuda
@pytest.mark.parametrize("backend", ["gathered", "flex"])
def test_a_replayed_graph_gives_what_the_eager_padded_pass_gives(backend):
    model = _cuda_tiny()
    shape = model.shape
    pool = KVPool(shape.num_layers, shape.num_kv_heads, shape.head_dim, 64, 16, model.dtype, "cuda")
    caches = _cuda_step(model, pool)
    lengths = [c.length for c in caches]
    ladder = BucketLadder((1, 2, 4), (1, 16))
    eager = PaddedForward(model, pool, ladder, attention=backend, graphs=False)
    graphed = PaddedForward(model, pool, ladder, attention=backend, graphs=True)
    stats = graphed.capture()
    assert stats.num_graphs == len(ladder.buckets())
    results = []
    for forward in (eager, graphed):
        for cache, n in zip(caches, lengths):
            cache.truncate(n)
        results.append(forward.run(_blocks_of_a_mixed_step(model, caches)))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


@cuda
def test_flex_attention_agrees_with_gathered_sdpa_on_cuda():
    model = _cuda_tiny()
    shape = model.shape
    pool = KVPool(shape.num_layers, shape.num_kv_heads, shape.head_dim, 64, 16, model.dtype, "cuda")
    caches = _cuda_step(model, pool)
    lengths = [c.length for c in caches]
    results = []
    for backend in ("gathered", "flex"):
        for cache, n in zip(caches, lengths):
            cache.truncate(n)
        results.append(PaddedForward(model, pool, BucketLadder((1, 2, 4), (1, 16)), attention=backend)
                       .run(_blocks_of_a_mixed_step(model, caches)))
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-4)
