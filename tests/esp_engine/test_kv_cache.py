"""The KV pool: blocks handed out as runs, grown in place or moved, always given back;
compaction keeps exactly the accepted path, in order, after the committed prefix."""

import pytest
import torch

from esp_engine.engine import LLMEngine
from esp_engine.kv_cache import BlockAllocator, KVCache, KVCacheFull, KVPool, compact_caches, default_kv_budget
from esp_engine.scheduler import SchedulerConfig


def _pool(num_blocks: int, block_size: int = 4) -> KVPool:
    return KVPool(num_layers=2, num_kv_heads=1, head_dim=2, num_blocks=num_blocks, block_size=block_size,
                  dtype=torch.float32)


def _fill(cache: KVCache, n: int, offset: int = 0) -> KVCache:
    for slot in range(n):
        cache.keys[:, :, slot] = slot + offset
        cache.values[:, :, slot] = -(slot + offset)
    cache.length = n
    return cache


def _cache_with_slots(n: int) -> KVCache:
    return _fill(KVCache.standalone(num_layers=2, num_kv_heads=1, head_dim=2, capacity=16, dtype=torch.float32), n)


# ---- allocator -----------------------------------------------------------------------------

def test_allocator_hands_out_first_fit_runs_and_merges_freed_neighbours():
    a = BlockAllocator(10)
    assert [a.allocate(3), a.allocate(3), a.allocate(3)] == [0, 3, 6]
    assert a.num_free == 1 and a.allocate(2) is None
    a.free(3, 3)
    assert a.allocate(4) is None  # 3 + 1 free, but not consecutive
    a.free(0, 3)
    assert a.largest_free_run == 6 and a.allocate(5) == 0
    a.free(0, 5)
    a.free(6, 3)
    assert a.num_free == 10 and a.largest_free_run == 10


def test_allocator_extends_in_place_only_into_free_blocks():
    a = BlockAllocator(8)
    first, second = a.allocate(2), a.allocate(2)
    assert not a.extend(first, 2, 3)  # `second` sits right after it
    assert a.extend(second, 2, 5) and a.num_free == 1
    a.free(first, 2)
    a.free(second, 5)
    assert a.num_free == 8


def test_allocator_rejects_double_free_and_out_of_range():
    a = BlockAllocator(4)
    start = a.allocate(2)
    a.free(start, 2)
    with pytest.raises(ValueError):
        a.free(start, 2)
    with pytest.raises(ValueError):
        a.free(3, 2)


def test_allocator_reserve_takes_an_exact_free_run():
    a = BlockAllocator(6)
    a.reserve(2, 2)
    assert a.num_free == 4 and a.allocate(3) is None and a.allocate(2) == 0
    with pytest.raises(ValueError):
        a.reserve(3, 1)


# ---- pool and caches -----------------------------------------------------------------------

def test_pool_is_sized_from_a_memory_budget():
    bytes_per_block = 2 * 2 * 1 * 2 * 4 * 4  # k+v, layers, heads, dim, slots, fp32
    pool = KVPool.from_budget(10 * bytes_per_block + 5, 2, 1, 2, 4, torch.float32)
    assert pool.num_blocks == 10 and pool.nbytes == 10 * bytes_per_block
    with pytest.raises(ValueError):
        KVPool.from_budget(bytes_per_block - 1, 2, 1, 2, 4, torch.float32)


def test_caches_are_views_of_the_pool_and_release_their_blocks():
    pool = _pool(6)
    a, b = pool.allocate(5), pool.allocate(4)
    assert (a.capacity, b.capacity) == (8, 4) and pool.usage() == pytest.approx(3 / 6)
    _fill(b, 3, offset=100)
    assert pool.keys[0, 0, 8:11, 0].tolist() == [100, 101, 102]  # b starts at block 2 = slot 8
    a.release()
    a.release()  # idempotent
    b.release()
    assert pool.usage() == 0.0
    assert pool.allocate(25) is None  # more than the pool holds


def test_cache_grows_in_place_when_the_next_blocks_are_free():
    pool = _pool(8)
    cache = _fill(pool.allocate(4, max_capacity=32), 3)
    cache.ensure(9)
    assert cache.start_block == 0 and cache.capacity >= 9
    assert cache.keys[0, 0, :3, 0].tolist() == [0, 1, 2]


def test_cache_moves_when_blocked_and_keeps_its_contents():
    pool = _pool(8)
    cache = _fill(pool.allocate(4, max_capacity=32), 4)
    other = pool.allocate(4)  # right behind `cache`: no room in place
    cache.ensure(12)
    assert cache.start_block == 2 and cache.capacity == 12
    assert cache.keys[1, 0, :4, 0].tolist() == [0, 1, 2, 3]
    assert cache.values[0, 0, :4, 0].tolist() == [0, -1, -2, -3]
    other.release()
    cache.release()
    assert pool.allocator.num_free == 8


def test_a_lone_cache_can_always_move_to_the_front_of_its_pool():
    pool = _pool(6)
    front = pool.allocate(8)  # blocks 0-1
    cache = _fill(pool.allocate(12, max_capacity=24), 10)  # blocks 2-4, last block free
    front.release()
    cache.ensure(24)  # 6 blocks: only the whole pool, overlapping its own run
    assert cache.start_block == 0 and cache.capacity == 24
    assert cache.keys[0, 0, :10, 0].tolist() == list(range(10))


def test_cache_that_finds_no_room_raises_and_stays_intact():
    pool = _pool(4)
    cache = _fill(pool.allocate(4, max_capacity=64), 4)
    other = pool.allocate(12)
    with pytest.raises(KVCacheFull):
        cache.ensure(8)
    assert (cache.start_block, cache.capacity) == (0, 4) and cache.keys[0, 0, :4, 0].tolist() == [0, 1, 2, 3]
    other.release()
    cache.release()
    assert pool.allocator.num_free == 4


def test_cache_refuses_to_grow_past_its_limit():
    cache = _cache_with_slots(4)
    with pytest.raises(RuntimeError, match="overflow"):
        cache.ensure(17)


# ---- compaction ----------------------------------------------------------------------------

def test_compact_moves_accepted_nodes_after_base():
    cache = _cache_with_slots(10)  # 4 committed, block rows in slots 4..9
    cache.compact(base=4, kept_slots=[4, 6, 9])  # root, then accepted nodes at rows 2 and 5
    assert cache.length == 7
    assert cache.keys[0, 0, :7, 0].tolist() == [0, 1, 2, 3, 4, 6, 9]
    assert cache.values[1, 0, :7, 0].tolist() == [0, -1, -2, -3, -4, -6, -9]


def test_compact_of_a_contiguous_path_copies_nothing():
    cache = _cache_with_slots(8)
    before = cache.keys.clone()
    cache.compact(base=3, kept_slots=[3, 4])
    # Bits, not values: slots never written hold whatever the allocator left, NaN included.
    assert cache.length == 5 and torch.equal(cache.keys.view(torch.int32), before.view(torch.int32))


def test_caches_of_one_pool_compact_together_as_each_would_alone():
    pool, alone = _pool(num_blocks=12), _pool(num_blocks=12)
    plans = [(10, 4, [4, 6, 9]), (7, 2, [2, 3]), (9, 5, [5, 8]), (6, 6, [])]  # rows, base, kept slots
    together = [_fill(pool.allocate(n), n, offset=100 * i) for i, (n, _, _) in enumerate(plans)]
    separate = [_fill(alone.allocate(n), n, offset=100 * i) for i, (n, _, _) in enumerate(plans)]
    compact_caches([(c, base, kept) for c, (_, base, kept) in zip(together, plans)])
    for c, (_, base, kept) in zip(separate, plans):
        c.compact(base, kept)
    assert [c.length for c in together] == [c.length for c in separate] == [7, 4, 7, 6]
    for a, b in zip(together, separate):
        assert torch.equal(a.keys[:, :, : a.length], b.keys[:, :, : b.length])
        assert torch.equal(a.values[:, :, : a.length], b.values[:, :, : b.length])
    assert together[0].keys[0, 0, :7, 0].tolist() == [0, 1, 2, 3, 4, 6, 9]
    assert together[2].keys[0, 0, :7, 0].tolist() == [200, 201, 202, 203, 204, 205, 208]


def test_truncate_drops_mask_rows():
    cache = _cache_with_slots(6)
    cache.truncate(4)
    assert cache.length == 4


# ---- the default budget --------------------------------------------------------------------

def test_default_budget_on_a_cpu_is_bounded_by_the_weights_but_fits_one_sequence():
    cpu = torch.device("cpu")
    assert default_kv_budget(10, 64, 1000, cpu) == 640  # enough for every sequence: below the weights' cap
    assert default_kv_budget(100, 64, 1000, cpu) == 2000  # twice the weights
    assert default_kv_budget(5000, 64, 1000, cpu) == 5000  # one full-length sequence always fits
    assert default_kv_budget(2**30, 64, 2**32, cpu) == 4 * 2**30  # never over 4 GiB


def _weight_bytes(loaded) -> int:
    return loaded.model.stored_bytes()


def test_embedded_model_pool_is_bounded_by_its_weights(smol, smol_engine):
    pool = smol_engine.kv_pool
    assert pool.nbytes <= 2 * _weight_bytes(smol) < 4 * 2**30
    assert pool.num_slots >= smol.max_model_len, "a full-length request must fit in the empty pool"


def test_a_tiny_model_still_gets_room_for_a_full_length_sequence(tiny):
    engine = LLMEngine(tiny, scheduler_config=SchedulerConfig(load_adaptive=False))
    assert engine.kv_pool.nbytes > 2 * _weight_bytes(tiny)  # the floor, not the weights, decides here
    assert tiny.max_model_len <= engine.kv_pool.num_slots < SchedulerConfig().max_num_seqs * tiny.max_model_len
