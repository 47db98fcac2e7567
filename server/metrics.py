"""Prometheus metrics, in a registry the app owns (several apps may live in one process).

Names follow vLLM where a vLLM metric means the same thing, so existing dashboards work; the
`esp:` ones describe the speculative passes themselves.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from esp_engine.outputs import EngineStats, StepStats

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
_ACCEPT_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)
_ROWS_BUCKETS = (1, 2, 4, 8, 10, 16, 24, 30, 40, 60, 90, 120, 200)
TOKEN_RATE_WINDOW_S = 10.0


class RecentRate:
    """Events per second over the last `window_s` seconds: the worker adds, a scrape reads.

    Read at scrape time, so the rate falls back to 0 once nothing has happened for a window,
    even while the worker sleeps waiting for requests."""

    def __init__(self, window_s: float = TOKEN_RATE_WINDOW_S, clock=time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._events: deque[tuple[float, int]] = deque()
        self._total = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            now = self._clock()
            self._events.append((now, n))
            self._total += n
            self._expire(now)

    def rate(self) -> float:
        with self._lock:
            self._expire(self._clock())
            return self._total / self.window_s

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.window_s:
            self._total -= self._events.popleft()[1]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = ""  # set by `bind` once the model (and so its served name) is known
        r, m = self.registry, ["model_name"]
        self.requests_received = Counter("esp:requests_received", "HTTP generation requests received.",
                                         m + ["endpoint"], registry=r)
        self.request_success = Counter("vllm:request_success", "Generations that finished normally.",
                                       m + ["finished_reason"], registry=r)
        self.request_errors = Counter("esp:request_errors", "Requests answered with an error.",
                                      m + ["status"], registry=r)
        self.requests_aborted = Counter("esp:requests_aborted", "Engine requests ended early and freed.",
                                        m + ["reason"], registry=r)
        self.requests_rejected = Counter("esp:requests_rejected",
                                         "Requests refused before reaching the engine: 429 at capacity "
                                         "(reason saturated), 503 while shutting down (reason draining).",
                                         m + ["reason"], registry=r)
        self.running = Gauge("vllm:num_requests_running", "Sequences being decoded.", m, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Sequences waiting for prefill.", m, registry=r)
        self.kv_cache_bytes = Gauge("esp:kv_cache_bytes", "Bytes held by all KV caches.", m, registry=r)
        self.kv_cache_usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of the KV-cache pool in use (1 = full).",
                                    m, registry=r)
        self.num_preemptions = Counter("vllm:num_preemptions", "Sequences preempted for KV-cache room (their KV is "
                                       "recomputed when they return).", m, registry=r)
        self._preemptions_seen = 0
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefilled prompt tokens.", m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", m, registry=r)
        self.prefix_cache_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                            m, registry=r)
        self.prefix_cache_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens served by the prefix cache.",
                                         m, registry=r)
        self.tokens_per_second = Gauge("esp:generation_tokens_per_second",
                                       f"Generated tokens per second over the last {TOKEN_RATE_WINDOW_S:g} s.",
                                       m, registry=r)
        self.token_rate = RecentRate()
        self.queue_time = Histogram("vllm:request_queue_time_seconds",
                                    "Arrival to the start of the first engine step that scheduled the request "
                                    "(its first prefill chunk).", m, buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Arrival to first token.", m,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("vllm:inter_token_latency_seconds", "Time per output token after the first.",
                                     m, buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token.", m,
                             buckets=_E2E_BUCKETS, registry=r)
        self.num_drafts = Counter("vllm:spec_decode_num_drafts", "Decode passes that verified a draft.", m,
                                  registry=r)
        self.num_draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Draft tokens verified.", m,
                                        registry=r)
        self.num_accepted_tokens = Counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.", m,
                                           registry=r)
        self.accepted_per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted at each depth (0 = first).", m + ["position"],
                                        registry=r)
        self.acceptance_length = Histogram("esp:acceptance_length", "Tokens committed per decode pass.",
                                           m + ["method"], buckets=_ACCEPT_BUCKETS, registry=r)
        self.forward_calls = Counter("esp:forward_calls", "Decode forward passes (prefill excluded).",
                                     m + ["method"], registry=r)
        self.tokens_committed = Counter("esp:tokens_committed", "Tokens committed by decode passes.",
                                        m + ["method"], registry=r)
        self.forward_calls_saved = Counter("esp:forward_calls_saved",
                                           "Decode forward passes saved against plain decoding (tokens committed "
                                           "by a pass - 1).", m + ["method"], registry=r)
        self.block_rows = Histogram("esp:block_rows", "Rows of each decode block (the block complexity used).",
                                    m + ["method"], buckets=_ROWS_BUCKETS, registry=r)

    def bind(self, model_name: str) -> None:
        self.model_name = model_name
        self.publish(EngineStats(0, 0, 0, 0.0, 0))  # a scrape before the first request sees zeros, not missing series
        self.tokens_per_second.labels(model_name).set_function(self.token_rate.rate)
        for reason in ("client", "stop_string", "error"):
            self.requests_aborted.labels(model_name, reason)
        for reason in ("saturated", "draining"):
            self.requests_rejected.labels(model_name, reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_step(self, step: StepStats) -> None:
        name, method = self.model_name, step.method
        self.forward_calls.labels(name, method).inc()
        self.tokens_committed.labels(name, method).inc(step.num_committed)
        self.forward_calls_saved.labels(name, method).inc(max(0, step.num_committed - 1))
        self.acceptance_length.labels(name, method).observe(step.num_committed)
        self.block_rows.labels(name, method).observe(step.block_rows)
        if step.num_draft_tokens:
            self.num_drafts.labels(name).inc()
            self.num_draft_tokens.labels(name).inc(step.num_draft_tokens)
            self.num_accepted_tokens.labels(name).inc(step.num_accepted_tokens)
            # Accepted tokens form a path from the root, so depths 0..accepted-1 each gain one.
            for pos in range(step.num_accepted_tokens):
                self.accepted_per_pos.labels(name, str(pos)).inc()

    def observe_tokens(self, num_new: int) -> None:
        """Tokens generated (first token and stop token included), for the counter and the recent rate."""
        self.generation_tokens.labels(self.model_name).inc(num_new)
        self.token_rate.add(num_new)

    def publish(self, stats: EngineStats) -> None:
        """The engine's load gauges, from its per-step snapshot."""
        name = self.model_name
        self.running.labels(name).set(stats.num_running)
        self.waiting.labels(name).set(stats.num_waiting)
        self.kv_cache_bytes.labels(name).set(stats.kv_cache_bytes)
        # Prefix-cache accounting can leave a float a hair outside 0..1.
        self.kv_cache_usage.labels(name).set(min(1.0, max(0.0, stats.kv_cache_usage)))
        self.num_preemptions.labels(name).inc(max(0, stats.num_preemptions - self._preemptions_seen))
        self._preemptions_seen = max(self._preemptions_seen, stats.num_preemptions)
