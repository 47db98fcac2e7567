"""One request's state as it moves from waiting to running to finished."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .config import SamplingParams, SpecConfig
from .kv_cache import KVCache
from .proposers.base import Proposer
from .sampling import TokenChooser


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # no KV cache: new, or preempted
    PREFILLING = "prefilling"  # KV cache allocated, prompt (or recomputed context) partly cached
    RUNNING = "running"  # decoding
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    req_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    spec: SpecConfig
    chooser: TokenChooser
    proposer: Proposer
    cache: KVCache | None = None
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    was_scheduled: bool = False  # admitted at least once (a preempted one comes back as a recomputation)
    prompt_logprobs: list[dict | None] | None = None  # per prompt token (the first has none), when asked

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def prefill_ids(self) -> list[int]:
        """What the KV cache must hold before decoding: the prompt, or after a preemption
        everything but the last committed token (the next step's root)."""
        return self.prompt_ids + self.output_ids[:-1] if self.output_ids else self.prompt_ids

    @property
    def remaining(self) -> int:
        return self.sampling.max_new_tokens - len(self.output_ids)
