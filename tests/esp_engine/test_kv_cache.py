"""KV compaction keeps exactly the accepted path, in order, after the committed prefix."""

import torch

from esp_engine.kv_cache import KVCache


def _cache_with_slots(n: int) -> KVCache:
    cache = KVCache(num_layers=2, num_kv_heads=1, head_dim=2, capacity=16, dtype=torch.float32)
    for slot in range(n):
        cache.keys[:, :, slot] = slot
        cache.values[:, :, slot] = -slot
    cache.length = n
    return cache


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
    assert cache.length == 5 and torch.equal(cache.keys, before)


def test_truncate_drops_mask_rows():
    cache = _cache_with_slots(6)
    cache.truncate(4)
    assert cache.length == 4


def test_cache_grows_on_demand_and_keeps_its_contents():
    cache = _cache_with_slots(10)
    cache.max_capacity = 1000
    cache.ensure(12)
    assert cache.capacity == 16
    cache.ensure(40)
    assert cache.capacity >= 272 and cache.keys.shape[2] == cache.capacity
    assert cache.keys[0, 0, :10, 0].tolist() == list(range(10))


def test_cache_refuses_to_grow_past_its_limit():
    import pytest

    cache = _cache_with_slots(4)
    with pytest.raises(RuntimeError, match="overflow"):
        cache.ensure(17)
