"""The default KV budget on a CPU (docs/engine.md, KV cache): room for any request the context
allows, at most twice the model's weights, never over 4 GiB."""

from __future__ import annotations

from esp_engine.scheduler import SchedulerConfig
from esp_engine.engine import LLMEngine


def _weight_bytes(loaded) -> int:
    return sum(p.numel() * p.element_size() for p in loaded.model.parameters())


def test_embedded_model_pool_is_bounded_by_its_weights(smol, smol_engine):
    pool = smol_engine.kv_pool
    assert pool.nbytes <= 2 * _weight_bytes(smol) < 4 * 2**30
    assert pool.num_slots >= smol.max_model_len, "a full-length request must fit in the empty pool"


def test_a_tiny_model_still_gets_room_for_a_full_length_sequence(tiny):
    engine = LLMEngine(tiny, scheduler_config=SchedulerConfig(load_adaptive=False))
    assert engine.kv_pool.nbytes > 2 * _weight_bytes(tiny)  # the floor, not the weights, decides here
    assert tiny.max_model_len <= engine.kv_pool.num_slots < SchedulerConfig().max_num_seqs * tiny.max_model_len

