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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .kv_cache import KVCache
from .model import LlamaFamilyModel


def _best_times(runs: Sequence[Callable[[], object]], reset: Callable[[], object], repeats: int,
                device: torch.device) -> list[float]:
    """Best wall time of each of `runs` over `repeats` rounds that take them in turn, after one
    warm-up each, `reset` before every run. Taking them in turn keeps their ratios, which decide
    tree sizes, from following a machine whose speed drifts between minutes."""
    best = [float("inf")] * len(runs)
    for round_ in range(repeats + 1):  # round 0 warms kernels up
        for i, run in enumerate(runs):
            reset()
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_:
                best[i] = min(best[i], time.perf_counter() - start)
    return best


def _interpolate(xs: list[int], ys: list[float], x: int) -> float:
    """ys at x, linear between the measured points and beyond the last two."""
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return ys[-1] + slope * (x - xs[-1])


@dataclass(slots=True)
class StepCostModel:
    """Seconds per forward pass by number of block rows, linearly interpolated."""

    rows: list[int]
    seconds: list[float]
    per_sequence: float = 0.0  # extra seconds for each further sequence in a batched pass (its attention)
    head_seconds: list[float] | None = None  # the LM head alone over the same row counts

    def cost(self, num_rows: int) -> float:
        return _interpolate(self.rows, self.seconds, num_rows)

    def head_cost(self, num_rows: int) -> float | None:
        """Seconds of one LM-head call over `num_rows` rows; None where it was not measured."""
        if self.head_seconds is None:
            return None
        return _interpolate(self.rows, self.head_seconds, num_rows) if num_rows > 0 else 0.0

    def one_head_call_pays(self, choosing: int, extra: int, taken: int) -> bool:
        """Whether one LM-head call over `choosing + extra` rows costs no more than a call over
        `choosing` and a second over the `taken` rows chosen among the extra ones."""
        one = self.head_cost(choosing + extra)
        return one is not None and one <= self.head_cost(choosing) + self.head_cost(taken)

    @classmethod
    def measure(cls, model: LlamaFamilyModel, rows: tuple[int, ...] = (1, 2, 4, 6, 8, 12, 16, 24, 32),
                context: int = 256, repeats: int = 3) -> "StepCostModel":
        """Time blocks of each size after `context` cached tokens; the best of `repeats`."""
        shape = model.shape
        context = min(context, shape.max_position - max(rows) - 1)
        cache = KVCache.standalone(shape.num_layers, shape.num_kv_heads, shape.head_dim, context + max(rows), model.dtype, model.device)
        ids = torch.randint(0, shape.vocab_size, (context + max(rows),), device=model.device)
        model(cache, model.embed(ids[:context]), torch.arange(context, device=model.device), None)
        def block(n: int):
            mask = torch.ones(n, n, dtype=torch.bool, device=model.device).tril_() if n > 1 else None
            embeds = model.embed(ids[context : context + n])
            positions = torch.arange(context, context + n, device=model.device)

            def run() -> None:
                hidden = model(cache, embeds, positions, mask)
                model.logits(hidden[: max(1, n // 2)])
            return run

        seconds = _best_times([block(n) for n in rows], lambda: cache.truncate(context), repeats, model.device)
        hidden = torch.randn(max(rows), shape.hidden_size, device=model.device).to(model.dtype)
        head = _best_times([lambda n=n: model.logits(hidden[:n]) for n in rows], lambda: None, repeats, model.device)
        return cls(list(rows), seconds, cls._measure_per_sequence(model, context, repeats), head)

    @staticmethod
    def _measure_per_sequence(model: LlamaFamilyModel, context: int, repeats: int, batch: int = 8) -> float:
        """8 sequences of one row against one sequence of 8 rows: the difference is the price
        of the per-sequence attention calls of a batched pass."""
        shape = model.shape
        caches = [KVCache.standalone(shape.num_layers, shape.num_kv_heads, shape.head_dim, context + batch,
                                     model.dtype, model.device) for _ in range(batch)]
        ids = torch.randint(0, shape.vocab_size, (context + 1,), device=model.device)
        for cache in caches:
            model(cache, model.embed(ids[:context]), torch.arange(context, device=model.device), None)
        embeds = model.embed(ids[context:].expand(batch))
        positions = torch.full((batch,), context, device=model.device)
        one_mask = torch.ones(batch, batch, dtype=torch.bool, device=model.device).tril_()

        def reset() -> None:
            for cache in caches:
                cache.truncate(context)

        together, alone = _best_times(
            [lambda: model.forward_batch(caches, embeds, positions, [None] * batch, [1] * batch),
             lambda: model(caches[0], embeds, torch.arange(context, context + batch, device=model.device), one_mask)],
            reset, repeats, model.device)
        return max(0.0, (together - alone) / (batch - 1))

    def batch_cost(self, num_rows: int, num_sequences: int) -> float:
        return self.cost(num_rows) + self.per_sequence * max(0, num_sequences - 1)


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


SHARES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass(frozen=True, slots=True)
class LoadTunerConfig:
    """The load tuner's knobs."""

    decay: float = 0.99  # per recorded pass: about the last 100 passes of a (key, share) count
    prior_weight: float = 1.0
    explore_batch: int = 2  # largest batch that tries shares with no record yet
    # Above that batch, speculation must be predicted to beat plain decoding by this much: the cost
    # model is off for wide batched passes (per-sequence masked attention, Python bookkeeping),
    # and a wrong choice there slows every sequence at once.
    margin: float = 0.1
    correction_decay: float = 0.9  # per observed pass: the last ten or so passes of a kind count
    # Above `explore_batch` the model's word is not enough: what speculative passes really gained
    # over plain ones is measured per batch bucket, and a measured loss stops speculation there,
    # re-checked once every `probe_every` passes (acceptance drifts with the requests in flight).
    probe_every: int = 32  # (also: at small batches, the longest run of plain passes without a try)
    # Each re-check that finds speculation still losing doubles the wait for the next, up to this:
    # a check costs a slow pass, which at `probe_every` passes apart is a visible share of
    # throughput and at this many nothing.
    max_probe_every: int = 512
    gain_decay: float = 0.7  # per speculative pass: the last three or so count


@dataclass(frozen=True, slots=True)
class SequenceFeedback:
    """What one sequence's block yielded in a pass."""

    keys: tuple[str, ...]  # the proposer's names for this draft; empty: not to be learnt from
    share: int  # rows the block was allowed
    tokens: int  # tokens it committed
    rows: int  # rows it used


@dataclass(frozen=True, slots=True)
class PassFeedback:
    """One decode pass as it ran: the tuner's only input after `choose`."""

    num_sequences: int  # decoding sequences in the pass
    num_rows: int
    is_speculative: bool  # some block carried more than its root
    seconds: float | None  # None: not timed (prefill chunks rode along and would blur the cost)
    num_committed: int
    sequences: Sequence[SequenceFeedback] = ()


class LoadTuner:
    """Rows per sequence for a batched decode pass, from measured step cost and acceptance.

    Each step every decoding sequence may use at most `share` rows (its root, its tree and
    its masks or lookahead window). The tuner picks the share that maximises the batch's
    expected tokens per second: sum over sequences of the tokens a pass commits at that
    share, over the measured cost of a pass of that many rows and sequences. On a GPU a pass
    costs the same for 1 or 64 rows, so shares stay large; on a CPU, or as the batch grows, a
    larger share stops paying and the tuner falls back towards plain decoding (share 1),
    which commits exactly one token per pass by definition. Tokens per pass at each share
    are learnt per proposer key with a decaying average, starting from an optimistic prior so
    every share gets tried.
    """

    def __init__(self, costs: StepCostModel, config: LoadTunerConfig | None = None) -> None:
        self.costs = costs
        self.config = config or LoadTunerConfig()
        self._tokens: dict[tuple[str, int], float] = {}
        self._rows: dict[tuple[str, int], float] = {}
        self._weight: dict[tuple[str, int], float] = {}
        self._correction: dict[tuple[bool, int], float] = {}  # measured / modelled time
        self._gain: dict[int, float] = {}  # batch bucket -> measured speedup of speculation
        self._since_probe: dict[int, int] = {}  # batch bucket -> passes since speculation
        self._probe_wait: dict[int, int] = {}  # batch bucket -> plain passes between re-checks
        self._plain_streak = 0  # plain passes chosen in a row at small batches
        self._retry_every = 0  # plain passes at small batches before the next try (0: `probe_every`)
        self._retried = False  # the last small-batch choice was such a try

    # ---- feedback ----------------------------------------------------------------------------
    def observe(self, feedback: PassFeedback) -> None:
        """Learn from one pass: what each sequence's share yielded and, for a timed pass, how far
        the cost model was off and what speculation really gained at this batch size."""
        for seq in feedback.sequences:
            for key in seq.keys:
                self._record(key, seq.share, seq.tokens, seq.rows)
        if feedback.seconds is not None:
            self._observe_time(feedback.num_sequences, feedback.num_rows, feedback.is_speculative,
                               feedback.seconds, feedback.num_committed)

    def _record(self, key: str, share: int, tokens: int, rows: int) -> None:
        if share <= 1:
            return
        cfg, k = self.config, (key, share)
        self._tokens[k] = self._tokens.get(k, 0.0) * cfg.decay + tokens
        self._rows[k] = self._rows.get(k, 0.0) * cfg.decay + rows
        self._weight[k] = self._weight.get(k, 0.0) * cfg.decay + 1.0

    def _observe_time(self, num_sequences: int, num_rows: int, speculative: bool, seconds: float, tokens: int) -> None:
        modelled = self.costs.batch_cost(num_rows, num_sequences)
        if modelled <= 0 or seconds <= 0:
            return
        cfg = self.config
        bucket = self._batch_bucket(num_sequences)
        key = (speculative, bucket)
        old = self._correction.get(key)
        ratio = seconds / modelled
        self._correction[key] = ratio if old is None else old * cfg.correction_decay + ratio * (1 - cfg.correction_decay)
        if not speculative:
            self._since_probe[bucket] = self._since_probe.get(bucket, 0) + 1
        elif (False, bucket) in self._correction:
            # A plain pass of these sequences would commit one token each in the time measured
            # for plain passes of this size.
            plain_seconds = self.costs.batch_cost(num_sequences, num_sequences) * self.correction(False, num_sequences)
            gain = (tokens / seconds) / (num_sequences / plain_seconds)
            old_gain = self._gain.get(bucket)
            self._gain[bucket] = gain if old_gain is None else old_gain * cfg.gain_decay + gain * (1 - cfg.gain_decay)
            self._since_probe[bucket] = 0
            wait = self._probe_wait.get(bucket, cfg.probe_every)
            self._probe_wait[bucket] = min(2 * wait, cfg.max_probe_every) if self._gain[bucket] < 1.0 else cfg.probe_every

    # ---- what it has learnt --------------------------------------------------------------------
    @staticmethod
    def _batch_bucket(num_sequences: int) -> int:
        """1, 2, 3-4, 5-8, 9-16, ...: batches alike enough to share a correction."""
        return max(0, num_sequences - 1).bit_length()

    def correction(self, speculative: bool, num_sequences: int) -> float:
        """How much longer passes of this kind really took than the start-up model says. Until a
        speculative pass of this batch size has run, the plain passes' error stands in for it: the
        model is off for both alike (per-sequence work it does not count), and an unmeasured kind
        must not look cheaper than a measured one."""
        bucket = self._batch_bucket(num_sequences)
        plain = self._correction.get((False, bucket), 1.0)
        return self._correction.get((True, bucket), plain) if speculative else plain

    def measured_gain(self, num_sequences: int) -> float | None:
        """Tokens per second of recent speculative passes of this batch size over what plain
        passes of the same size deliver; None until one has run."""
        return self._gain.get(self._batch_bucket(num_sequences))

    @staticmethod
    def prior(share: int) -> float:
        return 1.0 + 0.5 * (share - 1) ** 0.5

    def expected(self, key: str, share: int, explore: bool = True) -> float:
        """Tokens a pass commits for a sequence drafting under `key` allowed `share` rows. Without
        `explore`, a share never tried counts as plain decoding (one token)."""
        if share <= 1:
            return 1.0
        k = (key, share)
        w = self._weight.get(k, 0.0)
        prior = self.prior(share) if explore else 1.0
        return (self._tokens.get(k, 0.0) + prior * self.config.prior_weight) / (w + self.config.prior_weight)

    def expected_rows(self, key: str, share: int) -> float:
        """Rows it really uses: n-gram methods often draft less than their share, or nothing."""
        if share <= 1:
            return 1.0
        k = (key, share)
        w = self._weight.get(k, 0.0)
        return (self._rows.get(k, 0.0) + share * self.config.prior_weight) / (w + self.config.prior_weight)

    def pays_alone(self, key: str, share: int) -> bool:
        """Whether `share` rows drafted under `key` commit more tokens per second than one plain
        row, for one sequence by itself (exploring: an untried share is given its optimistic prior)."""
        rows = max(1, round(self.expected_rows(key, share)))
        return self.expected(key, share) / self.costs.cost(rows) > 1.0 / self.costs.cost(1)

    # ---- the choice -----------------------------------------------------------------------------
    def choose(self, keys: list[str], caps: list[int], extra_rows: int = 0) -> int:
        """The share for this pass; `keys` are the decoding sequences' proposer keys, `caps` each
        one's own largest block, `extra_rows` the prefill rows riding along."""
        cfg = self.config
        top = max(caps, default=1)
        # Try untested shares only while the batch is small: a wrong guess then costs one cheap
        # pass, while at a large batch it multiplies every sequence's rows at once.
        explore = len(caps) <= cfg.explore_batch
        margin = 0.0 if explore else cfg.margin
        best_share, best_rate, plain_rate = 1, 0.0, 0.0
        runner_up, runner_up_rate = 1, 0.0  # the best share above 1
        for share in [s for s in SHARES if s < top] + [top]:
            rows = sum(self.expected_rows(k, min(share, cap)) for k, cap in zip(keys, caps)) + extra_rows
            tokens = sum(self.expected(k, min(share, cap), explore) for k, cap in zip(keys, caps))
            n = len(caps) + (extra_rows > 0)
            rate = tokens / (self.costs.batch_cost(round(rows), n) * self.correction(share > 1, n))
            if share == 1:
                plain_rate = rate
            elif rate > runner_up_rate:
                runner_up, runner_up_rate = share, rate
            if rate > best_rate * (1 + 1e-9) and (share == 1 or rate > plain_rate * (1 + margin)):
                best_share, best_rate = share, rate
        if best_share > 1 and not explore and not self._may_speculate(len(caps)):
            return 1
        if explore and runner_up > 1:
            return self._retry_now_and_then(best_share, runner_up)
        return best_share

    def _retry_now_and_then(self, best_share: int, runner_up: int) -> int:
        """A small batch never settles on plain decoding for good: a share's record may come
        from text that had nothing to copy or guess, and without a pass now and then it is never
        revised. A try after which plain decoding still comes out best doubles the wait."""
        cfg = self.config
        wait = self._retry_every or cfg.probe_every
        if self._retried:
            self._retried = False
            self._retry_every = min(2 * wait, cfg.max_probe_every) if best_share == 1 else cfg.probe_every
        if best_share > 1:
            self._plain_streak = 0
            return best_share
        self._plain_streak += 1
        if self._plain_streak > (self._retry_every or cfg.probe_every):
            self._plain_streak, self._retried = 0, True
            return runner_up
        return 1

    def _may_speculate(self, num_sequences: int) -> bool:
        """No loss measured at this batch size, or a re-check is due (then the next one is due
        at least `probe_every` plain passes later, even if this pass, riding with a prefill chunk,
        goes unmeasured)."""
        gain = self.measured_gain(num_sequences)
        if gain is None or gain >= 1.0:
            return True
        bucket = self._batch_bucket(num_sequences)
        if self._since_probe.get(bucket, 0) < self._probe_wait.get(bucket, self.config.probe_every):
            return False
        self._since_probe[bucket] = 0
        return True
