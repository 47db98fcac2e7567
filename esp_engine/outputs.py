"""What the engine hands its callers: per-request deltas and the stats of the pass behind them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StepStats:
    """What one decode pass of one sequence did (for metrics)."""

    method: str
    num_draft_tokens: int
    num_accepted_tokens: int
    num_committed: int
    block_rows: int


@dataclass(slots=True)
class RequestOutput:
    """Tokens a request committed since its previous output."""

    req_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or "error"
    num_prompt_tokens: int
    num_output_tokens: int
    new_logprobs: list[dict] | None = None  # one per new token, then the stop token's when one ended the request
    step: StepStats | None = None
    stop_token_id: int | None = None  # the EOS/stop id that ended the request (not in new_token_ids)
    error: Exception | None = None  # set with finish_reason "error": this request failed, others go on
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    # With the first output of a request that asked for them: one entry per prompt token, None for the first.
    prompt_logprobs: list[dict | None] | None = None


@dataclass(slots=True)
class GenerationResult:
    output_ids: list[int]
    finish_reason: str
    num_prompt_tokens: int
    num_decode_calls: int
    num_decode_tokens: int
    wall_s: float
    logprobs: list[dict] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine's load, taken once per step (gauges for the server)."""

    num_running: int  # prefilling or decoding
    num_waiting: int
    kv_cache_bytes: int  # held by live sequences (the pool itself is preallocated)
    kv_cache_usage: float  # share of the pool's blocks held by live sequences, 0..1
    num_preemptions: int  # since start
    newly_scheduled: tuple[str, ...] = ()  # requests the latest step took from the queue for the first time
