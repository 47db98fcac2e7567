"""Continuous batching: requests join, leave, wait for KV blocks, get preempted and recomputed,
have long prompts prefilled in chunks next to decoding ones, and every output still equals
plain decoding of that request alone; every KV block is back in the pool afterwards."""

import random

import pytest
import torch

from esp_engine.config import SamplingParams, SpecConfig
from esp_engine.cost_model import LoadTuner, StepCostModel
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
    received, finished = _drain(engine, lambda e, _: batch.append(e.num_running))
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
    received, finished = _drain(engine, lambda e, _: waited.append(e.num_waiting))
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
        seq = e.sequences.get(second)
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
    received, _ = _drain(engine, lambda e, _: sizes.append(e.num_running))
    assert max(sizes) == 2 and len(received) == 5


def test_bad_scheduler_settings_are_refused():
    with pytest.raises(InvalidRequestError):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(InvalidRequestError):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4)


# ---- load-adaptive speculation -----------------------------------------------------------------

FLAT = StepCostModel(rows=[1, 64], seconds=[0.010, 0.0101])  # a GPU at small batch: rows are free
STEEP = StepCostModel(rows=[1, 4, 10, 30, 60], seconds=[0.0145, 0.0167, 0.0213, 0.037, 0.0627], per_sequence=0.0005)


def _trained(costs: StepCostModel, tokens_at: dict[int, float]) -> LoadTuner:
    tuner = LoadTuner(costs)
    for share, tokens in tokens_at.items():
        for _ in range(200):
            tuner.record("esp", share, tokens)
    return tuner


def test_load_tuner_keeps_big_trees_when_rows_are_free():
    tuner = _trained(FLAT, {s: 1 + 0.1 * s ** 0.5 for s in (2, 3, 4, 6, 8, 12, 16, 24, 32)})
    assert tuner.choose(["esp"], [32]) == 32
    assert tuner.choose(["esp"] * 8, [32] * 8) == 32


def test_load_tuner_falls_back_to_plain_decoding_when_speculation_does_not_pay():
    # About ESP's acceptance on SmolLM2 (tau 1.13 at 10 rows, 1.21 at 30) against the CPU's step cost.
    tuner = _trained(STEEP, {s: 1 + 0.02 * s if s < 10 else 1.13 + 0.004 * (s - 10) for s in (2, 3, 4, 6, 8, 12, 16, 24, 32)})
    assert tuner.choose(["esp"], [32]) == 1
    assert tuner.choose(["ar", "esp"], [1, 32]) == 1


def test_load_tuner_shrinks_the_share_as_the_batch_grows():
    tuner = _trained(STEEP, {2: 1.5, 3: 1.8, 4: 2.0, 6: 2.2, 8: 2.3, 12: 2.4, 16: 2.5, 24: 2.5, 32: 2.5})
    shares = [tuner.choose(["pld"] * n, [32] * n) for n in (1, 4, 16)]
    assert shares[0] > 1 and shares == sorted(shares, reverse=True) and shares[-1] < shares[0]


def test_load_tuner_tries_untested_shares_only_at_small_batches():
    fresh = LoadTuner(FLAT)
    assert fresh.choose(["pld"], [16]) > 1  # alone: an optimistic guess costs one cheap pass
    assert fresh.choose(["pld"] * 8, [16] * 8) == 1  # eight at once: nothing known, nothing risked
    for _ in range(50):
        fresh.record("pld", 16, 3, rows=10)
    assert fresh.choose(["pld"] * 8, [16] * 8) == 16  # once measured, it pays at any batch


def test_load_tuner_speculates_at_large_batches_only_when_clearly_ahead():
    for gain, expected in ((1.05, 1), (1.3, 2)):
        tuner = LoadTuner(FLAT)
        for _ in range(200):
            tuner.record("pld", 2, gain, rows=2)
        assert tuner.choose(["pld"], [2]) == 2  # alone, any predicted gain is taken
        # Eight at once: a 5% predicted gain is within the cost model's error, so plain decoding.
        assert tuner.choose(["pld"] * 8, [2] * 8) == expected


def test_load_tuner_corrects_its_cost_model_from_measured_passes():
    tuner = LoadTuner(FLAT)
    for _ in range(200):
        tuner.record("pld", 4, 1.5, rows=4)
    assert tuner.choose(["pld"] * 8, [4] * 8) == 4  # modelled: 1.5x the tokens for free rows
    for _ in range(5):  # measured: speculative passes of eight take twice what the model says
        tuner.observe_pass(8, 32, True, 2 * FLAT.batch_cost(32, 8))
        tuner.observe_pass(8, 8, False, FLAT.batch_cost(8, 8))
    assert tuner.correction(True, 8) > 1.8 and tuner.correction(False, 8) == pytest.approx(1.0)
    assert tuner.choose(["pld"] * 8, [4] * 8) == 1
    assert tuner.choose(["pld"], [4]) > 1  # one sequence alone: another batch size, still as modelled


def test_load_tuner_counts_an_unmeasured_speculative_pass_as_slow_as_measured_plain_ones():
    tuner = LoadTuner(FLAT)
    for _ in range(5):
        tuner.observe_pass(16, 16, False, 1.4 * FLAT.batch_cost(16, 16))
    assert tuner.correction(False, 16) == pytest.approx(1.4)
    assert tuner.correction(True, 16) == pytest.approx(1.4)


def test_load_tuner_stops_speculating_where_it_measured_a_loss_and_rechecks_later():
    tuner = LoadTuner(FLAT)
    for _ in range(200):
        tuner.record("pld", 4, 1.5, rows=4)
    plain = FLAT.batch_cost(8, 8)

    def plain_passes(n: int) -> None:
        for _ in range(n):
            tuner.observe_pass(8, 8, False, plain)

    plain_passes(1)
    assert tuner.choose(["pld"] * 8, [4] * 8) == 4  # the model predicts 1.5x
    # Measured: speculative passes of eight commit 9 tokens in the time plain ones commit 8 in
    # 0.8 of it, i.e. 0.9x; whatever the model says, plain decoding it is.
    tuner.observe_pass(8, 32, True, plain / 0.8, tokens=9)
    assert tuner.measured_gain(8) == pytest.approx(0.9)
    assert tuner.choose(["pld"] * 8, [4] * 8) == 1
    assert tuner.choose(["pld"], [4]) > 1  # alone: another batch size, nothing measured there
    plain_passes(tuner.probe_every)
    assert tuner.choose(["pld"] * 8, [4] * 8) == 1  # a measured loss doubled the wait ...
    plain_passes(tuner.probe_every)
    assert tuner.choose(["pld"] * 8, [4] * 8) == 4  # ... to 64 passes: a re-check is due,
    assert tuner.choose(["pld"] * 8, [4] * 8) == 1  # once, even if that pass went unmeasured
    tuner.observe_pass(8, 32, True, plain, tokens=12)  # this time speculation paid: 1.5x
    assert tuner.measured_gain(8) > 1.0
    assert tuner.choose(["pld"] * 8, [4] * 8) == 4


def test_load_tuner_at_small_batches_tries_its_best_share_again_after_a_run_of_plain_passes():
    # Early requests whose drafts were all rejected (text with nothing to copy or guess): every
    # share recorded one token for two rows, and plain decoding would otherwise be chosen for ever.
    tuner = LoadTuner(STEEP)
    for share in (2, 3, 4, 6, 8, 12, 16):
        for _ in range(200):
            tuner.record("pld", share, 1, rows=2)
    choices = [tuner.choose(["pld"], [16]) for _ in range(300)]
    tries = [i for i, c in enumerate(choices) if c != 1]
    # The first try after 32 plain passes; each try after which plain still wins doubles the wait.
    assert tries[0] == tuner.probe_every and len(tries) == 3
    assert tries[2] - tries[1] > tries[1] - tries[0] > tuner.probe_every
    assert [tuner.choose(["pld"] * 8, [16] * 8) for _ in range(100)] == [1] * 100  # never at a big batch


def test_load_tuner_says_whether_a_share_pays_for_one_sequence_alone():
    tuner = LoadTuner(STEEP)
    assert tuner.pays_alone("hybrid-masks", 8)  # untried: its optimistic prior
    for _ in range(50):
        tuner.record("hybrid-masks", 8, 1.1, rows=8)  # 10% more tokens for 30% more time
    assert not tuner.pays_alone("hybrid-masks", 8)
    flat = LoadTuner(FLAT)
    for _ in range(50):
        flat.record("hybrid-masks", 8, 1.1, rows=8)  # rows cost nothing: any gain pays
    assert flat.pays_alone("hybrid-masks", 8)


def test_hybrid_under_a_cap_without_a_chain_drafts_masks_only_where_they_paid(tiny):
    engine = LLMEngine(tiny, scheduler_config=SchedulerConfig(load_adaptive=True))
    engine.load_tuner.costs = STEEP
    req = engine.add_request(list(range(12)), SamplingParams(max_new_tokens=20), SpecConfig.from_preset("hybrid", "bc30"))
    seq = engine.sequences[req]
    context = seq.context
    assert not seq.proposer.chains(context)  # twelve distinct tokens: nothing to copy
    assert engine._fit(seq, 8, context)[1]  # nothing known yet: masks get their try
    for _ in range(50):
        engine.load_tuner.record("hybrid-masks", 8, 1.1, rows=8)
    assert not engine._fit(seq, 8, context)[1]  # seen not to pay: no mask rows
    assert engine._fit(seq, 30, context)[1]  # the whole preset is not a cap: the full tree, masks included
    engine.abort_request(req)


def test_load_adaptive_engine_stays_lossless(tiny):
    prompts = _prompts(4, seed=5)
    sampling = SamplingParams(max_new_tokens=25, ignore_eos=True)
    expected = [_solo(tiny, p, sampling) for p in prompts]
    engine = LLMEngine(tiny, scheduler_config=SchedulerConfig(load_adaptive=True))
    ids = [engine.add_request(p, sampling, SpecConfig.from_preset(*MIXED[i + 1])) for i, p in enumerate(prompts)]
    received, _ = _drain(engine)
    assert [received[i] for i in ids] == expected and _pool_is_empty(engine)


# ---- the batched pass -------------------------------------------------------------------------

def test_a_batched_pass_equals_each_sequence_run_alone(tiny):
    """Two sequences with different cache lengths and tree masks in one pass: each row's hidden
    state equals the same block run on its own."""
    from esp_engine.kv_cache import KVCache
    from esp_engine.tree import block_layout

    model = tiny.model
    shape = model.shape

    def cache_with(prefix):
        cache = KVCache.standalone(shape.num_layers, shape.num_kv_heads, shape.head_dim, 64, model.dtype)
        model(cache, model.embed(torch.tensor(prefix)), torch.arange(len(prefix)), None)
        return cache

    prefixes = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12, 13]]
    layouts = [block_layout((0, 0, 1), 1, (0, 0)), block_layout((0, 1), 0, (0, 0))]
    blocks = [torch.tensor([3, 1, 2, 5] + [0] * layouts[0].num_tree_rows), torch.tensor([9, 4, 6])]
    alone = []
    for prefix, layout, ids in zip(prefixes, layouts, blocks):
        alone.append(model(cache_with(prefix), model.embed(ids), layout.offsets + len(prefix), layout.attn))
    caches = [cache_with(p) for p in prefixes]
    together = model.forward_batch(caches, model.embed(torch.cat(blocks)),
                                   torch.cat([l.offsets + len(p) for l, p in zip(layouts, prefixes)]),
                                   [l.attn for l in layouts], [len(b) for b in blocks])
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)
    assert [c.length for c in caches] == [len(p) + len(b) for p, b in zip(prefixes, blocks)]
