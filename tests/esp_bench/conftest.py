"""Fixtures: a real server on the session's model, for `esp-bench serve` to drive."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import pytest
from liveserver import running


class BenchServer(NamedTuple):
    base_url: str  # the server's root, without /v1
    api_key: str


@pytest.fixture(scope="module")
def bench_server(smol) -> Iterator[BenchServer]:
    """A server as esp-serve configures it (prefix caching on), with KV room for a few short
    requests only: the sweeps here never have more in flight."""
    from esp_engine.scheduler import SchedulerConfig
    from server.app import ServerSettings, build_app

    scheduler = SchedulerConfig(enable_prefix_caching=True, max_num_seqs=4, kv_cache_bytes=64 * 2**20)
    settings = ServerSettings(api_key="bench-key", scheduler=scheduler)
    with running(build_app(settings, loader=lambda: smol)) as url:
        yield BenchServer(url, settings.api_key)
