"""Prefix caching: a prompt whose beginning an earlier request computed starts from a copy of
that KV, in whole blocks, never the last token; outputs are those of a cold start; entries only
use free blocks and give them up before any request waits or is preempted."""

import pytest
import torch

from esp_engine.chat import render_chat
from esp_engine.config import SamplingParams, SpecConfig
from esp_engine.engine import LLMEngine
from esp_engine.kv_cache import KVPool
from esp_engine.prefix_cache import PrefixCache
from esp_engine.scheduler import SchedulerConfig
from tests.conftest import chat_ids

BS = 4


def _pool(num_blocks: int = 16) -> KVPool:
    pool = KVPool(num_layers=2, num_kv_heads=1, head_dim=3, num_blocks=num_blocks, block_size=BS, dtype=torch.float32)
    pool.keys.zero_()
    pool.values.zero_()
    return pool


def _computed(pool: KVPool, ids: list[int]):
    """A cache holding KV that encodes each token id and its position, as a prefill would."""
    cache = pool.allocate(len(ids) + 8)
    for pos, t in enumerate(ids):
        cache.keys[:, :, pos] = t * 1000 + pos
        cache.values[:, :, pos] = -(t * 1000 + pos)
    cache.length = len(ids)
    return cache


def test_a_hit_copies_whole_blocks_and_leaves_the_last_token_to_compute():
    pool = _pool()
    pc = PrefixCache(pool)
    prompt = list(range(1, 11))  # 10 tokens: two whole blocks
    src = _computed(pool, prompt)
    assert pc.store(prompt, src)
    src.release()
    dst = pool.allocate(16)
    n = pc.load(prompt + [42, 43], dst)
    assert n == 8 and dst.length == 8
    assert torch.equal(dst.keys[:, :, :8], torch.tensor([t * 1000 + p for p, t in enumerate(prompt[:8])],
                                                         dtype=torch.float32).view(1, 1, 8, 1).expand(2, 1, 8, 3))
    assert torch.equal(dst.values[:, :, :8], -dst.keys[:, :, :8])
    # The same 8-token prompt again: its last token must still be computed, so one block only.
    again = pool.allocate(16)
    assert pc.load(prompt[:8], again) == 4
    assert pc.num_hit_tokens == 12 and pc.num_queried_tokens == 20


def test_prompts_match_only_on_identical_whole_blocks():
    pool = _pool()
    pc = PrefixCache(pool)
    pc.store(list(range(12)), _computed(pool, list(range(12))))
    dst = pool.allocate(32)
    assert pc.load([0, 1, 2, 3, 4, 5, 99, 7, 8, 9, 10, 11, 12], dst) == 4  # differs inside block 2
    assert pc.load([9, 1, 2, 3, 4, 5, 6, 7, 8], dst) == 0  # differs in the first block
    assert pc.load([0, 1, 2], dst) == 0  # shorter than a block


def test_a_hash_collision_never_serves_other_tokens(monkeypatch):
    pool = _pool()
    pc = PrefixCache(pool)
    monkeypatch.setattr(pc, "_chain", lambda ids, n: list(range(n)))  # every prompt hashes alike
    pc.store([1, 2, 3, 4, 5], _computed(pool, [1, 2, 3, 4, 5]))
    assert pc.load([7, 7, 7, 7, 7], pool.allocate(8)) == 0


def test_a_longer_prefix_replaces_the_entry_it_extends_and_lru_entries_go_first():
    pool = _pool(32)
    pc = PrefixCache(pool)
    a = list(range(100, 108))
    scratch = _computed(pool, a + list(range(8)))
    pc.store(a[:4] + [0], scratch)  # one block: [100..103]
    pc.store(a, scratch)  # two blocks, extending it: the one-block entry is dropped
    assert pc.num_entries == 1 and pc.num_blocks == 2
    b = [7] * 8
    pc.store(b, _computed(pool, b))
    assert pc.num_entries == 2
    assert pc.load(a + [1], pool.allocate(12)) == 8  # `a` is now the most recently used
    assert pc.evict_one() and pc.num_entries == 1
    assert pc.load(b + [1], pool.allocate(12)) == 0 and pc.load(a + [1], pool.allocate(12)) == 8
    pc.clear()
    assert pc.num_entries == 0 and pc.num_blocks == 0


def test_storing_into_a_full_pool_evicts_old_entries_or_gives_up():
    pool = _pool(4)
    pc = PrefixCache(pool)
    live = pool.allocate(8)  # two blocks held by a live sequence
    first = _computed_standalone([1] * 8)
    assert pc.store([1] * 8, first)  # the last two free blocks
    assert pool.allocator.num_free == 0
    assert pc.store([2] * 8, _computed_standalone([2] * 8))  # evicts the first entry
    assert pc.load([1] * 9, live) == 0 and pc.load([2] * 9, live) == 8
    assert not pc.store([3] * 16, _computed_standalone([3] * 16))  # bigger than all free blocks
    live.release()
    pc.clear()
    assert pool.allocator.num_free == pool.num_blocks


def _computed_standalone(ids):
    return _computed(_pool(8), ids)


# ---- in the engine ---------------------------------------------------------------------------

SYSTEM = ("You are a careful assistant for a bakery. Answer in one short sentence, use plain words, "
          "never invent prices, and say when you do not know.")


def _chat(tok, question: str) -> list[int]:
    return render_chat(tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])


@pytest.mark.parametrize("method,preset", [("ar", None), ("esp", "bc30"), ("hybrid", "bc30")])
def test_requests_sharing_a_system_prompt_skip_its_prefill_and_decode_the_same(smol, smol_engine, method, preset):
    questions = ["When do you open?", "Do you sell rye bread?", "Can I order a cake for Sunday?"]
    prompts = [_chat(smol.tokenizer, q) for q in questions]
    sampling = SamplingParams(max_new_tokens=12)
    spec = SpecConfig.from_preset(method, preset)
    # Without the prefix cache, with the same method: reusing cached blocks must change nothing.
    cold = [smol_engine.generate(p, sampling, spec).output_ids for p in prompts]
    engine = LLMEngine(smol, scheduler_config=SchedulerConfig(enable_prefix_caching=True, block_size=16))
    def common(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    warm = []
    for i, p in enumerate(prompts):
        req = engine.add_request(p, sampling, spec)
        out, cached = [], []
        while engine.has_unfinished():
            for o in engine.step():
                out += o.new_token_ids
                cached.append(o.num_cached_tokens)
        warm.append(out)
        shared = max((common(p, q) for q in prompts[:i]), default=0)
        assert cached[0] == shared // 16 * 16
        assert i == 0 or cached[0] >= 32  # the system prompt spans whole blocks
    assert warm == cold
    assert engine.stats().kv_cache_usage == pytest.approx(0.0, abs=1e-9)  # entries count as free
    engine.prefix_cache.clear()
    assert engine.kv_pool.allocator.num_free == engine.kv_pool.num_blocks


def test_cached_prefixes_make_room_before_any_request_waits(smol):
    tok = smol.tokenizer
    prompts = [_chat(tok, f"Question number {i}: what is your favourite bread?") for i in range(6)]
    sampling = SamplingParams(max_new_tokens=4, ignore_eos=True)
    slots = max(len(p) for p in prompts) + 4 + 64
    engine = LLMEngine(smol, scheduler_config=SchedulerConfig(
        enable_prefix_caching=True, block_size=16, kv_cache_bytes=_bytes_for(smol, 2 * slots)))
    for p in prompts:  # one after the other: entries pile up until the pool is short of room
        engine.generate(p, sampling, SpecConfig(method="ar"))
    assert engine.prefix_cache.num_entries >= 1
    need = 2 * (len(prompts[0]) + 6)
    assert engine.kv_pool.allocator.num_free * 16 < need, "the test needs a pool that entries have filled"
    reqs = [engine.add_request(p, sampling, SpecConfig(method="ar")) for p in prompts[:2]]
    waited = []
    while engine.has_unfinished():
        engine.step()
        waited.append(engine.stats().num_waiting)
    assert engine.scheduler.num_preemptions == 0 and waited[0] == 0, "an entry kept a request waiting"
    assert not engine.has_unfinished() and all(not engine.abort_request(r) for r in reqs)
    engine.prefix_cache.clear()
    assert engine.kv_pool.allocator.num_free == engine.kv_pool.num_blocks


def _bytes_for(loaded, slots: int) -> int:
    s = loaded.model.shape
    return KVPool.slot_bytes(s.num_layers, s.num_kv_heads, s.head_dim, loaded.model.dtype) * slots
