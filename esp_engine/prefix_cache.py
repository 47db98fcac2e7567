"""Prefix caching: the keys and values of prompt prefixes that earlier requests computed.

Requests to one server share their beginnings: the chat template's system prompt, an
application's instructions, few-shot examples, the earlier turns of a conversation. A prefix
whose KV is cached needs no forward pass when it comes back, which cuts prefill work and time
to first token.

Each of our sequences owns one run of consecutive pool blocks (kv_cache.py), so a cached prefix
cannot be mapped into a new sequence's cache as vLLM's paged blocks are; on a hit it is copied
in instead: one memory copy per layer (46 KB per token for SmolLM2) in place of a forward pass.
Entries live in the same pool, in blocks nobody else is using: the scheduler evicts the least
recently used entry before it makes a request wait or preempts one, so caching never takes
memory from live requests.

Prefixes are matched in whole blocks of `block_size` tokens, found through a hash chain over
the blocks and confirmed token by token, so a hash collision can never serve wrong keys.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .kv_cache import KVCache, KVPool


@dataclass(slots=True, eq=False)
class _Entry:
    token_ids: tuple[int, ...]
    cache: KVCache
    hashes: list[int]


class PrefixCache:
    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self._by_hash: dict[int, _Entry] = {}  # hash of blocks 0..i -> an entry holding them
        self._lru: OrderedDict[int, _Entry] = OrderedDict()  # id(entry) -> entry, oldest first
        self.num_queried_tokens = 0  # prompt tokens looked up
        self.num_hit_tokens = 0  # of those, served from the cache

    def _chain(self, token_ids: list[int], num_blocks: int) -> list[int]:
        hashes, h, bs = [], 0, self.block_size
        for i in range(num_blocks):
            h = hash((h, tuple(token_ids[i * bs : (i + 1) * bs])))
            hashes.append(h)
        return hashes

    @property
    def num_entries(self) -> int:
        return len(self._lru)

    @property
    def num_blocks(self) -> int:
        """Pool blocks the entries hold (free for the taking: any of them can be evicted)."""
        return sum(e.cache.num_blocks for e in self._lru.values())

    def _longest(self, token_ids: list[int], max_tokens: int) -> tuple[_Entry | None, int]:
        num_blocks = max_tokens // self.block_size
        hashes = self._chain(token_ids, num_blocks)
        for i in range(num_blocks - 1, -1, -1):
            entry = self._by_hash.get(hashes[i])
            n = (i + 1) * self.block_size
            if entry is not None and entry.token_ids[:n] == tuple(token_ids[:n]):
                return entry, n
        return None, 0

    @torch.inference_mode()
    def load(self, token_ids: list[int], cache: KVCache) -> int:
        """Copy the longest cached prefix of `token_ids` into the empty `cache`; its length.

        At least the last token is left out, so the prefill pass still yields its logits."""
        entry, n = self._longest(token_ids, min(len(token_ids) - 1, cache.capacity))
        self.num_queried_tokens += len(token_ids)
        if entry is None:
            return 0
        cache.keys[:, :, :n] = entry.cache.keys[:, :, :n]
        cache.values[:, :, :n] = entry.cache.values[:, :, :n]
        cache.length = n
        self._lru.move_to_end(id(entry))
        self.num_hit_tokens += n
        return n

    @torch.inference_mode()
    def store(self, token_ids: list[int], cache: KVCache) -> bool:
        """Keep the whole blocks of `token_ids` whose KV `cache` holds; whether a new entry was made.

        Uses free blocks only, evicting older entries when there are none."""
        n = min(len(token_ids), cache.length) // self.block_size * self.block_size
        if n == 0:
            return False
        entry, have = self._longest(token_ids, n)
        if have == n:
            self._lru.move_to_end(id(entry))
            return False
        while (copy := self.pool.allocate(n)) is None:
            if not self.evict_one():
                return False
        copy.keys[:, :, :n] = cache.keys[:, :, :n]
        copy.values[:, :, :n] = cache.values[:, :, :n]
        copy.length = n
        new = _Entry(tuple(token_ids[:n]), copy, self._chain(token_ids, n // self.block_size))
        for h in new.hashes:
            self._by_hash[h] = new
        self._lru[id(new)] = new
        # Entries whose every prefix the new one also holds are of no more use.
        for old in [e for e in self._lru.values() if e is not new and all(self._by_hash.get(h) is not e for h in e.hashes)]:
            self._drop(old)
        return True

    def evict_one(self) -> bool:
        """Free the least recently used entry's blocks; False when the cache is empty."""
        if not self._lru:
            return False
        self._drop(next(iter(self._lru.values())))
        return True

    def clear(self) -> None:
        while self.evict_one():
            pass

    def _drop(self, entry: _Entry) -> None:
        del self._lru[id(entry)]
        for h in entry.hashes:
            if self._by_hash.get(h) is entry:
                del self._by_hash[h]
        entry.cache.release()
