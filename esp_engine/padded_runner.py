"""Decode passes in static buckets: the GPU engine's path, the same code eager on a CPU.

`PaddedForward.run(blocks)` lays a step out in its bucket (`step_buckets`), runs the model over
the bucket's buffers, and returns the real rows' hidden states, in order, as the unpadded
`forward_batch` does. On CUDA each (bucket, context bucket) pass is a `torch.cuda.CUDAGraph`
captured once (at startup with `capture`, or the first time it is needed) and replayed; all
graphs share one memory pool, captured largest first as nano-vllm does. Elsewhere, or with
`graphs=False`, the same pass runs eagerly.

`PaddedModelRunner` is the model runner with that path for decode steps; a step with a prefill
chunk, or one that no bucket holds, runs as the plain runner runs it. Prefill stays eager.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .cost_model import StepCostModel
from .kv_cache import KVPool
from .model import LlamaFamilyModel
from .model_runner import ModelRunner, _Piece
from .padded_attention import (BACKENDS, FlexBlockAttention, GatheredAttention, SequenceAttention,
                               default_backend, flex_mask_mod)
from .step_buckets import BlockRows, Bucket, BucketLadder, StepBuffers, take_scratch_slot

log = logging.getLogger(__name__)

# The cached tokens a batched-SDPA pass gathers per sequence: a graph per bucket of them.
CONTEXT_BUCKETS = tuple(2**i for i in range(8, 18))  # 256 .. 131072


@dataclass(frozen=True, slots=True)
class CaptureStats:
    num_graphs: int
    seconds: float
    memory_bytes: int  # device memory reserved by the capture (graphs' pool and warm-up)


@dataclass(slots=True)
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # the graph's output buffer


class PaddedForward:
    """Padded passes of `model` over `pool`. `attention` is one of `padded_attention.BACKENDS`
    or "auto"; `graphs` None means CUDA graphs on CUDA, eager elsewhere."""

    def __init__(self, model: LlamaFamilyModel, pool: KVPool, ladder: BucketLadder | None = None,
                 attention: str = "auto", graphs: bool | None = None,
                 context_buckets: Sequence[int] = CONTEXT_BUCKETS) -> None:
        device = model.device
        self.attention = default_backend(device) if attention == "auto" else attention
        if self.attention not in BACKENDS:
            raise ValueError(f"unknown attention backend {attention!r}; choose auto or one of {', '.join(BACKENDS)}")
        self.use_graphs = device.type == "cuda" if graphs is None else graphs
        if self.use_graphs and (device.type != "cuda" or self.attention == "sequence"):
            raise ValueError("CUDA graphs need a CUDA device and a batched attention backend (gathered or flex)")
        self.model, self.pool = model, pool
        self.ladder = ladder or BucketLadder()
        self.context_buckets = tuple(context_buckets)
        self.scratch_slot = take_scratch_slot(pool)
        if self.attention == "flex":
            # FlexAttention reads whole KV blocks, stale slots too: torch.empty may hold NaN there,
            # and 0 * NaN would reach real rows. Once zeroed, every slot only ever holds finite
            # values. (Blocks already held are left as they are: build this before sequences take
            # blocks, as the engine does.)
            size = pool.block_size
            for start, length in pool.allocator.free_runs():
                pool.keys[:, :, start * size : (start + length) * size].zero_()
                pool.values[:, :, start * size : (start + length) * size].zero_()
        self.buffers = StepBuffers(self.ladder.largest, model.shape.hidden_size, model.dtype, device)
        self._flex_mask = flex_mask_mod(self.buffers, self.scratch_slot) if self.attention == "flex" else None
        self._backends: dict[tuple[Bucket, int], object] = {}
        self._graphs: dict[tuple[Bucket, int], _Graph] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.capture_seconds = 0.0
        self.last_key: tuple[Bucket, int] | None = None

    # ---- one pass ------------------------------------------------------------------------------
    def key(self, blocks: Sequence[BlockRows]) -> tuple[Bucket, int] | None:
        """(bucket, context bucket) of a pass over `blocks`; None when none holds it. The context
        bucket is 0 for backends that read the pool in place."""
        bucket = self.ladder.choose([blk.embeds.shape[0] for blk in blocks])
        if bucket is None:
            return None
        if self.attention != "gathered":
            return bucket, 0
        longest = max(blk.cache.length for blk in blocks)
        context = next((c for c in self.context_buckets if c >= longest), None)
        return None if context is None else (bucket, context)

    @torch.inference_mode()
    def run(self, blocks: Sequence[BlockRows]) -> torch.Tensor | None:
        """Hidden states [sum n, hidden] of the blocks' rows, or None (nothing run) when no bucket
        holds them. The caches grow by their blocks' rows, as with `forward_batch`."""
        key = self.key(blocks)
        if key is None:
            return None
        graph = self._graph(key) if self.use_graphs else None  # captured on padding, before the step is laid out
        layout = self.buffers.lay_out(key[0], blocks, self.scratch_slot)
        inputs = layout.inputs
        if self.attention == "sequence":
            hidden = self.model.forward_rows(inputs.embeds, inputs.positions, SequenceAttention(layout, self.pool))
        else:
            backend = self._backend(key)
            backend.fill(layout)
            if graph is not None:
                graph.graph.replay()
                hidden = graph.hidden
            else:
                hidden = self.model.forward_rows(inputs.embeds, inputs.positions, backend)
        layout.finish()
        self.last_key = key
        return hidden.index_select(0, layout.real_rows)

    def replay(self, key: tuple[Bucket, int]) -> torch.Tensor:
        """Replay a captured pass on whatever the buffers hold (device time alone, for benchmarks)."""
        graph = self._graphs[key]
        graph.graph.replay()
        return graph.hidden

    def _backend(self, key: tuple[Bucket, int]):
        if key not in self._backends:
            bucket, context = key
            inputs = self.buffers.inputs(bucket)
            if self.attention == "gathered":
                self._backends[key] = GatheredAttention(self.pool, inputs, self.scratch_slot, context)
            else:
                self._backends[key] = FlexBlockAttention(self.pool, inputs, self.scratch_slot, self._flex_mask,
                                                         compiled=self.model.device.type == "cuda")
        return self._backends[key]

    # ---- graphs --------------------------------------------------------------------------------
    def capture(self, buckets: Iterable[Bucket] | None = None, context: int | None = None) -> CaptureStats:
        """Capture the passes of `buckets` (default: the whole ladder) for sequences of up to
        `context` cached tokens (gathered attention's context bucket), largest first."""
        if not self.use_graphs:
            return CaptureStats(0, 0.0, 0)
        ctx = 0
        if self.attention == "gathered":
            ctx = next(c for c in self.context_buckets if c >= (context or self.context_buckets[0]))
        todo = [b for b in sorted(buckets or self.ladder.buckets(), key=lambda k: (-k.num_rows, -k.batch))
                if (b, ctx) not in self._graphs]
        torch.cuda.synchronize()
        reserved = torch.cuda.memory_reserved()
        start = time.perf_counter()
        for bucket in todo:
            self._graph((bucket, ctx))
        torch.cuda.synchronize()
        return CaptureStats(len(todo), time.perf_counter() - start, torch.cuda.memory_reserved() - reserved)

    def _graph(self, key: tuple[Bucket, int]) -> _Graph:
        if key in self._graphs:
            return self._graphs[key]
        started = time.perf_counter()
        bucket = key[0]
        backend = self._backend(key)
        layout = self.buffers.lay_out(bucket, [], self.scratch_slot)  # all padding: writes only the scratch slot
        backend.fill(layout)
        inputs = layout.inputs

        def body() -> torch.Tensor:
            return self.model.forward_rows(inputs.embeds, inputs.positions, backend)

        with torch.inference_mode():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up (compiles, autotunes) off the capture
                for _ in range(2):
                    body()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                hidden = body()
        self._graphs[key] = _Graph(graph, hidden)
        self.capture_seconds += time.perf_counter() - started
        log.debug("captured %s in %.2f s", key, time.perf_counter() - started)
        return self._graphs[key]

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)


class PaddedModelRunner(ModelRunner):
    """`ModelRunner` whose decode steps run through `PaddedForward`; the rest is unchanged, so it
    returns the same `StepResult`. `padded_passes` counts the steps that ran padded."""

    def __init__(self, model: LlamaFamilyModel, pool: KVPool, ladder: BucketLadder | None = None,
                 attention: str = "auto", graphs: bool | None = None,
                 step_costs: Callable[[], StepCostModel] | None = None) -> None:
        super().__init__(model, step_costs)
        self.padded = PaddedForward(model, pool, ladder, attention, graphs)
        self.padded_passes = 0

    def _forward(self, pieces: list[_Piece], rows: list[int]) -> torch.Tensor:
        if all(p.block is not None for p in pieces):  # decode blocks only: prefill stays eager
            hidden = self.padded.run([BlockRows(p.seq.cache, p.embeds, p.positions, p.attn) for p in pieces])
            if hidden is not None:
                self.padded_passes += 1
                return hidden
        return super()._forward(pieces, rows)
