"""Continuous batching: requests join, leave, wait for KV blocks, get preempted and recomputed,
have long prompts prefilled in chunks next to decoding ones, and every output still equals
plain decoding of that request alone; every KV block is back in the pool afterwards."""

import random

import pytest
import torch

from esp_engine.config import SamplingParams, SpecConfig
from esp_engine.engine import LLMEngine
from esp_engine.errors import InvalidRequestError
from esp_engine.scheduler import SchedulerConfig
from esp_engine.sequence import SequenceStatus
from tests.conftest import chat_ids

MIXED = [("ar", None), ("esp", "bc10"), ("esp", "bc30"), ("pld", "bc10"), ("pld", "bc30"), ("lade", "bc10"),
         ("hybrid", "bc10"), ("hybrid", "bc30"), ("esp", "bc60"), ("esp", "auto")]


def _prompts(n: int, seed: int = 0, length: int = 12) -> list[list[int]]:
    rng = random.Random(seed)
    base = [rng.randrange(16) for _ in range(6)]
    return [base + [rng.randrange(16) for _ in range(length - 6 + i % 5)] for i in range(n)]


def _solo(loaded, prompt, sampling) -> list[int]:
    return LLMEngine(loaded).generate(prompt, sampling, SpecConfig(method="ar")).output_ids


def _drain(engine: LLMEngine, on_step=None) -> dict[str, list[int]]:
    received: dict[str, list[int]] = {}
    finished: dict[str, str] = {}
    steps = 0
    while engine.has_unfinished():
        outs = engine.step()
        steps += 1
        assert steps < 5000, "the engine stopped making progress"
        for out in outs:
            received.setdefault(out.req_id, []).extend(out.new_token_ids)
            if out.finished:
                finished[out.req_id] = out.finish_reason
        if on_step:
            on_step(engine, steps)
    return received, finished


def _pool_is_empty(engine: LLMEngine) -> bool:
    return engine.kv_pool.allocator.num_free == engine.kv_pool.num_blocks and engine.kv_pool.usage() == 0.0


def test_sixteen_concurrent_mixed_requests_equal_their_solo_plain_outputs(smol, smol_engine):
    texts = ["Name three rivers.", "What is 12 times 7?", "Write one line about cats.", "Say hello.",
             "Translate 'good morning' into French.", "List two prime numbers.", "What colour is the sky?",
             "Give a synonym for fast.", "Count from one to five.", "Who wrote Hamlet?", "Define gravity briefly.",
             "Name a fruit that is yellow.", "What is the capital of Japan?", "Spell the word 'cat' backwards.",
             "Write a haiku about rain.", "Repeat after me: the quick brown fox."]
    prompts = [chat_ids(smol.tokenizer, t) for t in texts]
    lengths = [6 + (i * 5) % 11 for i in range(len(texts))]
    solo = [smol_engine.generate(p, SamplingParams(max_new_tokens=n), SpecConfig(method="ar")).output_ids
            for p, n in zip(prompts, lengths)]
    engine = LLMEngine(smol, scheduler_config=SchedulerConfig(max_num_batched_tokens=256))
    expected = {}
    for i, (prompt, n) in enumerate(zip(prompts, lengths)):
        method, preset = MIXED[i % len(MIXED)]
        stop = (solo[i][3],) if i % 4 == 1 else ()  # some stop on a token id mid-run
        req = engine.add_request(prompt, SamplingParams(max_new_tokens=n, stop_token_ids=stop),
                                 SpecConfig.from_preset(method, preset))
        expected[req] = solo[i][: solo[i].index(solo[i][3])] if stop else solo[i]
    batch = []
    received, finished = _drain(engine, lambda e, _: batch.append(e.stats().num_running))
    assert received == expected
    assert max(batch) == len(texts) and _pool_is_empty(engine)


def test_requests_join_and_leave_mid_flight(tiny):
    prompts = _prompts(8)
    sampling = SamplingParams(max_new_tokens=20, ignore_eos=True)
    solo = [_solo(tiny, p, sampling) for p in prompts]
    engine = LLMEngine(tiny)
    ids: dict[str, int] = {}
    for i in range(3):
        ids[engine.add_request(prompts[i], sampling, SpecConfig.from_preset(*MIXED[i + 1]))] = i
    cancelled = set()

    def churn(e: LLMEngine, step: int) -> None:
        if 2 <= step <= 6:  # newcomers while others decode
            i = step + 1
            ids[e.add_request(prompts[i], sampling, SpecConfig.from_preset(*MIXED[i]))] = i
        if step == 4:  # one cancelled mid-flight
            victim = next(r for r, i in ids.items() if i == 1)
            assert e.abort_request(victim)
            cancelled.add(victim)

    received, finished = _drain(engine, churn)
    for req, i in ids.items():
        if req in cancelled:
            assert req not in finished
        else:
            assert received[req] == solo[i] and finished[req] == "length"
    assert _pool_is_empty(engine)


def test_a_kv_pool_too_small_for_all_makes_requests_wait_and_preempts_without_changing_outputs(tiny):
    prompts = _prompts(6, seed=1)
    greedy = SamplingParams(max_new_tokens=40, ignore_eos=True)
    seeded = SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=0.9, top_p=0.9, seed=7)
    expect_greedy = [_solo(tiny, p, greedy) for p in prompts]
    expect_seeded = LLMEngine(tiny).generate(prompts[0], seeded, SpecConfig(method="ar")).output_ids
    shape = tiny.model.shape
    slot = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * 4
    # 12 blocks of 16 slots: room for about two of these requests at full length.
    engine = LLMEngine(tiny, scheduler_config=SchedulerConfig(kv_cache_bytes=12 * 16 * slot, block_size=16))
    ids = [engine.add_request(prompts[0], seeded, SpecConfig.from_preset("pld", "bc10"))]
    ids += [engine.add_request(p, greedy, SpecConfig.from_preset(*MIXED[i % len(MIXED)])) for i, p in enumerate(prompts[1:], 1)]
    waited = []
    received, finished = _drain(engine, lambda e, _: waited.append(e.stats().num_waiting))
    assert received[ids[0]] == expect_seeded  # seeded sampling survives preemption and recompute
    assert [received[r] for r in ids[1:]] == expect_greedy[1:]
    assert all(finished[r] == "length" for r in ids)
    assert max(waited) > 0 and engine.scheduler.num_preemptions > 0
    assert _pool_is_empty(engine)


def test_a_request_larger_than_the_whole_pool_is_refused_up_front(tiny):
    shape = tiny.model.shape
    slot = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * 4
    engine = LLMEngine(tiny, scheduler_config=SchedulerConfig(kv_cache_bytes=4 * 16 * slot))
    with pytest.raises(InvalidRequestError, match="KV"):
        engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=200))
    assert not engine.has_unfinished()


def test_long_prompts_are_prefilled_in_chunks_alongside_decoding(tiny):
    short, long = _prompts(1)[0], _prompts(1, seed=3, length=150)[0]
    sampling = SamplingParams(max_new_tokens=30, ignore_eos=True)
    expected = [_solo(tiny, short, sampling), _solo(tiny, long, sampling)]
    engine = LLMEngine(tiny, scheduler_config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=40))
    first = engine.add_request(short, sampling, SpecConfig.from_preset("esp", "bc10"))
    head = engine.step()[0].new_token_ids  # `first` is decoding from now on
    second = engine.add_request(long, sampling, SpecConfig.from_preset("esp", "bc10"))
    mixed = []

    def watch(e: LLMEngine, _):
        seq = e.scheduler.get(second)
        if seq is not None and seq.status is SequenceStatus.PREFILLING:
            mixed.append(seq.cache.length)

    received, _ = _drain(engine, watch)
    assert head + received[first] == expected[0] and received[second] == expected[1]
    assert len(mixed) >= 3  # several partial chunks, each stepped together with `first`'s decoding
    assert _pool_is_empty(engine)


def test_max_num_seqs_bounds_the_batch(tiny):
    engine = LLMEngine(tiny, scheduler_config=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64))
    for p in _prompts(5):
        engine.add_request(p, SamplingParams(max_new_tokens=5, ignore_eos=True), SpecConfig(method="ar"))
    sizes = []
    received, _ = _drain(engine, lambda e, _: sizes.append(e.stats().num_running))
    assert max(sizes) == 2 and len(received) == 5


def test_bad_scheduler_settings_are_refused():
    with pytest.raises(InvalidRequestError):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(InvalidRequestError):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4)


# ---- load-adaptive speculation -----------------------------------------------------------------

def test_load_adaptive_engine_stays_lossless(tiny):
    prompts = _prompts(4, seed=5)
    sampling = SamplingParams(max_new_tokens=25, ignore_eos=True)
    expected = [_solo(tiny, p, sampling) for p in prompts]
    engine = LLMEngine(tiny, scheduler_config=SchedulerConfig(load_adaptive=True))
    ids = [engine.add_request(p, sampling, SpecConfig.from_preset(*MIXED[i + 1])) for i, p in enumerate(prompts)]
    received, _ = _drain(engine)
    assert [received[i] for i in ids] == expected and _pool_is_empty(engine)


# ---- the batched pass -------------------------------------------------------------------------

def test_a_batched_pass_equals_each_sequence_run_alone_bit_for_bit(tiny):
    """Sequences of one pool with different cache lengths and tree masks in one pass: each row's
    hidden state is exactly the one the same block gets run alone, so a request's tokens never
    depend on which others share its pass."""
    from esp_engine.kv_cache import KVPool
    from esp_engine.tree import block_layout

    model = tiny.model
    shape = model.shape
    pool = KVPool(shape.num_layers, shape.num_kv_heads, shape.head_dim, 16, 16, model.dtype)

    def cache_with(prefix):
        cache = pool.allocate(64)
        model(cache, model.embed(torch.tensor(prefix)), torch.arange(len(prefix)), None)
        return cache

    prefixes = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12, 13], [3, 3, 3]]
    layouts = [block_layout((0, 0, 1), 1, (0, 0)), block_layout((0, 1), 0, (0, 0)), block_layout((), 0)]
    blocks = [torch.tensor([3, 1, 2, 5] + [0] * layouts[0].num_tree_rows), torch.tensor([9, 4, 6]), torch.tensor([2])]
    masks = [l.attn if l.num_rows > 1 else None for l in layouts]
    alone = []
    for prefix, layout, ids, mask in zip(prefixes, layouts, blocks, masks):
        cache = cache_with(prefix)
        alone.append(model(cache, model.embed(ids), layout.offsets + len(prefix), mask))
        cache.release()
    caches = [cache_with(p) for p in prefixes]
    together = model.forward_batch(caches, model.embed(torch.cat(blocks)),
                                   torch.cat([l.offsets + len(p) for l, p in zip(layouts, prefixes)]),
                                   masks, [len(b) for b in blocks])
    assert torch.equal(together, torch.cat(alone))
    assert [c.length for c in caches] == [len(p) + len(b) for p, b in zip(prefixes, blocks)]
