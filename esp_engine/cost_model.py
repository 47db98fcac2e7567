"""Choosing the tree size from measured step cost and observed acceptance.

On a GPU at batch 1 a pass costs about the same for 1 or 60 rows, so big trees are free; on a
CPU every row costs FLOPs (docs/benchmarks.md has the curve), and a tree only pays when the
tokens it adds per pass outgrow the time it adds. `BudgetTuner` keeps both sides measured:
the forward time for each block size, timed once on the loaded model, and how often the
r-th best depth-1 candidate is accepted. It picks the width n that maximises
expected tokens per pass / cost of the pass, i.e. tokens per second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .kv_cache import KVCache
from .model import LlamaFamilyModel


@dataclass(slots=True)
class StepCostModel:
    """Seconds per forward pass by number of block rows, linearly interpolated."""

    rows: list[int]
    seconds: list[float]

    def cost(self, num_rows: int) -> float:
        if num_rows <= self.rows[0]:
            return self.seconds[0]
        for (r0, s0), (r1, s1) in zip(zip(self.rows, self.seconds), zip(self.rows[1:], self.seconds[1:])):
            if num_rows <= r1:
                return s0 + (s1 - s0) * (num_rows - r0) / (r1 - r0)
        slope = (self.seconds[-1] - self.seconds[-2]) / (self.rows[-1] - self.rows[-2])
        return self.seconds[-1] + slope * (num_rows - self.rows[-1])

    @classmethod
    def measure(cls, model: LlamaFamilyModel, rows: tuple[int, ...] = (1, 2, 4, 6, 8, 12, 16, 24, 32),
                context: int = 256, repeats: int = 3) -> "StepCostModel":
        """Time blocks of each size after `context` cached tokens; the best of `repeats`."""
        shape = model.shape
        context = min(context, shape.max_position - max(rows) - 1)
        cache = KVCache(shape.num_layers, shape.num_kv_heads, shape.head_dim, context + max(rows), model.dtype, model.device)
        ids = torch.randint(0, shape.vocab_size, (context + max(rows),), device=model.device)
        model(cache, model.embed(ids[:context]), torch.arange(context, device=model.device), None)
        seconds = []
        for n in rows:
            mask = torch.ones(n, n, dtype=torch.bool, device=model.device).tril_()
            embeds = model.embed(ids[context : context + n])
            positions = torch.arange(context, context + n, device=model.device)
            best = float("inf")
            for _ in range(repeats + 1):  # the first run warms kernels up
                cache.truncate(context)
                start = time.perf_counter()
                hidden = model(cache, embeds, positions, mask if n > 1 else None)
                model.logits(hidden[: max(1, n // 2)])
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
            seconds.append(best)
        return cls(list(rows), seconds)


@dataclass(slots=True)
class BudgetTuner:
    """Adaptive width of a one-mask ESP tree (all draft nodes are children of the root)."""

    costs: StepCostModel
    max_width: int
    rows_per_node: int = 2  # k + 1 rows for each tree row
    prior_accept: float = 0.1  # optimistic start, so each width gets tried
    prior_weight: float = 5.0
    offered: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.offered = [0] * self.max_width
        self.accepted = [0] * self.max_width

    def acceptance(self, rank: int) -> float:
        prior = self.prior_accept / (rank + 1)
        return (self.accepted[rank] + prior * self.prior_weight) / (self.offered[rank] + self.prior_weight)

    def best_width(self, limit: int | None = None) -> int:
        limit = self.max_width if limit is None else min(limit, self.max_width)
        best_n, best_rate, expected = 1, 0.0, 1.0
        for n in range(1, limit + 1):
            expected += self.acceptance(n - 1)
            rate = expected / self.costs.cost(self.rows_per_node * (1 + n))
            if rate > best_rate:
                best_n, best_rate = n, rate
        return best_n

    def record(self, width: int, accepted_rank: int | None) -> None:
        for r in range(min(width, self.max_width)):
            self.offered[r] += 1
        if accepted_rank is not None and accepted_rank < self.max_width:
            self.accepted[accepted_rank] += 1
