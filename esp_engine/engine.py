"""The engine: requests in, committed tokens out, one batched forward pass per step.

`LLMEngine` is the public API and the wiring. It is synchronous and single-threaded on
purpose; the server drives it from one worker thread. A step is three calls:
`Scheduler.schedule()` picks the work (a block per decoding sequence, prefill chunks for
admitted ones), `ModelRunner.execute(plan)` runs it as one forward pass and verifies it, and
`Scheduler.update(plan, result)` commits, finishes and frees (docs/engine.md).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid

from .config import SamplingParams, SpecConfig
from .cost_model import LoadTuner, StepCostModel
from .errors import ContextLengthError, EngineError, InvalidRequestError
from .kv_cache import KVPool, default_kv_budget
from .loader import LoadedModel
from .model_runner import ModelRunner
from .padded_runner import PaddedModelRunner
from .outputs import EngineStats, GenerationResult, RequestOutput
from .prefix_cache import PrefixCache
from .proposers import ProposerFactory
from .sampling import TokenChooser
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence

log = logging.getLogger(__name__)

_MAX_SLACK = 256  # KV rows a decode block and prefill masks may add beyond the context, at most

# How decode steps run: `plain` lays every step out as it comes (ModelRunner); `padded` pads it
# into a static bucket, which is a captured CUDA graph on a GPU and an eager pass elsewhere
# (PaddedModelRunner); `auto` is padded on a GPU and plain on a CPU, where padding rows cost.
RUNNERS = ("auto", "plain", "padded")


class LLMEngine:
    def __init__(self, loaded: LoadedModel, default_spec: SpecConfig | None = None,
                 scheduler_config: SchedulerConfig | None = None, max_rows_per_step: int | None = None,
                 runner: str = "auto") -> None:
        """`scheduler_config` sets batching, the KV-cache budget and load-adaptive speculation;
        `max_rows_per_step` is a shortcut for its cap on the decode rows of one pass (vLLM's
        max_num_batched_tokens for decode): as the batch grows, each sequence's draft tree
        shrinks to its share, down to plain decoding. `runner` is one of `RUNNERS`."""
        if runner not in RUNNERS:
            raise ValueError(f"unknown runner {runner!r}; choose one of {', '.join(RUNNERS)}")
        config = scheduler_config or SchedulerConfig()
        if max_rows_per_step is not None:
            config = dataclasses.replace(config, max_rows_per_step=max_rows_per_step)
        self.loaded = loaded
        self.model = loaded.model
        self.default_spec = default_spec or SpecConfig.from_preset("esp", "bc30")
        self._step_costs: StepCostModel | None = None
        shape = self.model.shape
        per_slot = KVPool.slot_bytes(shape.num_layers, shape.num_kv_heads, shape.head_dim, self.model.dtype)
        budget = config.kv_cache_bytes or default_kv_budget(
            per_slot * (loaded.max_model_len + 2 * _MAX_SLACK), config.max_num_seqs,
            self.model.stored_bytes(), self.model.device)
        self.kv_pool = KVPool.from_budget(budget, shape.num_layers, shape.num_kv_heads, shape.head_dim,
                                          config.block_size, self.model.dtype, self.model.device)
        self.prefix_cache = PrefixCache(self.kv_pool) if config.enable_prefix_caching else None
        tuner = LoadTuner(self.step_costs()) if config.load_adaptive else None
        self.scheduler = Scheduler(config, self.kv_pool, loaded.max_model_len, tuple(loaded.eos_token_ids),
                                   tuner, self.prefix_cache)
        self.runner = self._runner(runner)
        self.proposers = ProposerFactory(self.model, self.step_costs)
        log.info("KV cache: %d blocks of %d slots (%.0f MiB)", self.kv_pool.num_blocks, config.block_size,
                 self.kv_pool.nbytes / 2**20)

    def _runner(self, kind: str) -> ModelRunner:
        if kind == "auto":
            kind = "padded" if self.model.device.type == "cuda" else "plain"
        if kind == "plain":
            return ModelRunner(self.model, self.step_costs)
        runner = PaddedModelRunner(self.model, self.kv_pool, step_costs=self.step_costs)
        stats = runner.padded.capture()  # the whole ladder now, so that no request waits for a capture
        log.info("decode steps run padded into %d buckets (%s attention); %d CUDA graphs captured in %.1f s, "
                 "%.0f MiB", len(runner.padded.ladder.buckets()), runner.padded.attention, stats.num_graphs,
                 stats.seconds, stats.memory_bytes / 2**20)
        return runner

    def step_costs(self) -> StepCostModel:
        """This machine's forward cost by block size, measured once on first use."""
        if self._step_costs is None:
            self._step_costs = StepCostModel.measure(self.model)
        return self._step_costs

    # ---- request lifecycle -------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], sampling: SamplingParams, spec: SpecConfig | None = None,
                    req_id: str | None = None) -> str:
        """Validate and queue a request; raises `InvalidRequestError` subclasses on bad input."""
        req_id = req_id or uuid.uuid4().hex
        self.validate(prompt_ids, sampling)
        spec = spec or self.default_spec
        seq = Sequence(req_id, list(prompt_ids), sampling, spec, TokenChooser(sampling), self.proposers.create(spec))
        self.scheduler.add(seq)
        return req_id

    def validate(self, prompt_ids: list[int], sampling: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty: give at least one token")
        vocab = self.model.shape.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        limit = self.loaded.max_model_len
        if len(prompt_ids) + sampling.max_new_tokens > limit:
            raise ContextLengthError(
                f"this model's maximum context length is {limit} tokens; the prompt has {len(prompt_ids)} "
                f"and {sampling.max_new_tokens} more were requested ({len(prompt_ids) + sampling.max_new_tokens} in all)"
            )

    def abort_request(self, req_id: str) -> bool:
        """Forget a request and free its KV cache. Returns whether it existed."""
        return self.scheduler.abort(req_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        """The engine's load now. KV usage counts prefix-cache entries as free, as vLLM does: any
        of them is evicted the moment a request needs room."""
        sched = self.scheduler
        cached = self.prefix_cache.num_blocks if self.prefix_cache is not None else 0
        held = sum(s.cache.nbytes for s in sched.requests.values() if s.cache is not None)
        return EngineStats(sched.num_running, sched.num_waiting, held,
                           self.kv_pool.usage() - cached / self.kv_pool.num_blocks, sched.num_preemptions,
                           tuple(sched.newly_scheduled))

    # ---- stepping ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass: schedule -> execute -> update."""
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        return self.scheduler.update(plan, self.runner.execute(plan))

    def generate(self, prompt_ids: list[int], sampling: SamplingParams, spec: SpecConfig | None = None) -> GenerationResult:
        """Run one request to completion (benchmarks, tests, the CLI); other requests in the
        engine advance alongside."""
        start = time.perf_counter()
        req_id = self.add_request(prompt_ids, sampling, spec)
        output_ids: list[int] = []
        logprobs: list[dict] = []
        decode_calls = decode_tokens = 0
        while True:
            mine = [o for o in self.step() if o.req_id == req_id]
            if not mine:
                continue
            out = mine[0]
            if out.error is not None:
                raise EngineError(f"generation failed: {out.error}") from out.error
            output_ids.extend(out.new_token_ids)
            logprobs.extend(out.new_logprobs or [])
            if out.step is not None:
                decode_calls += 1
                decode_tokens += out.step.num_committed
            if out.finished:
                break
        return GenerationResult(output_ids, out.finish_reason or "stop", len(prompt_ids), decode_calls,
                                decode_tokens, time.perf_counter() - start, logprobs)
