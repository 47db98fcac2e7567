"""Calling a matmul so that each row's result is the same whatever the call's row count.

Speculative decoding is lossless only if a token's hidden state is the same whether it was
computed alone (plain decoding, one row) or inside a verify block of many rows. GEMM libraries
pick kernels by the row count M, and kernels differ in how they split and order the reduction
over K: oneDNN on an AVX512 CPU gives a 1-row call of a down projection a different rounding
from a 2-row call, while every call of 2 to 128 rows agrees (docs/engine.md has the
measurements). A `RowPlan` turns every call into calls of a row count inside such a range:
fewer rows are padded with zeros, more are split into chunks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .cpu_info import cpu_info

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RowPlan:
    """Calls of `min_rows` to `max_rows` rows (None: no upper bound) give each row the same result."""

    min_rows: int = 1
    max_rows: int | None = None

    def apply(self, matmul: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if self.min_rows <= m and (self.max_rows is None or m <= self.max_rows):
            return matmul(x)
        if m < self.min_rows:
            return matmul(_pad_rows(x, self.min_rows))[:m]
        parts = []
        for start in range(0, m, self.max_rows):
            chunk = x[start : start + self.max_rows]
            n = chunk.shape[0]
            parts.append(matmul(chunk) if n >= self.min_rows else matmul(_pad_rows(chunk, self.min_rows))[:n])
        return torch.cat(parts)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    padded = x.new_zeros((rows, *x.shape[1:]))
    padded[: x.shape[0]] = x
    return padded


# Row counts a probe calls with: every small count (kernels switch there), then both sides of
# the powers of two where GEMM libraries change blocking.
PROBE_ROWS = (*range(1, 18), 23, 24, 31, 32, 33, 47, 48, 63, 64, 65, 95, 96, 127, 128)
_MIN_ROW_CHOICES = (1, 2, 4, 8)
_MAX_ROW_CHOICES = (128, 64, 32, 16, 8, 4, 2, 1)
_PROBE_WINDOWS = 8  # windows of each row count compared: rounding shows on some rows, not all


def probe(matmul: Callable[[torch.Tensor], torch.Tensor], in_features: int, dtype: torch.dtype,
          device: torch.device | str, *, seed: int = 0) -> RowPlan:
    """The widest `RowPlan` under which `matmul` gives every row the result it has in a call of
    exactly `min_rows` rows, found by calling it on random rows with each of `PROBE_ROWS`.

    Kernel choice depends on the shape, not on the values, so random rows stand for any; but a
    different rounding shows only on some rows, so each row count is tried on several windows.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total = PROBE_ROWS[-1] + 32
    x = torch.randn(total, in_features, generator=gen).to(device=device, dtype=dtype)
    best = RowPlan(1, 1)  # one row per call is the same for every row
    for min_rows in _MIN_ROW_CHOICES:
        reference = torch.cat([matmul(_pad_rows(x[i : i + 1], min_rows))[:1] for i in range(total)])
        first_bad = next((m for m in PROBE_ROWS if m >= min_rows and not _agrees(matmul, x, reference, m)), None)
        if first_bad is None:
            return RowPlan(min_rows, PROBE_ROWS[-1])
        max_rows = next((c for c in _MAX_ROW_CHOICES if min_rows <= c < first_bad), min_rows)
        if max_rows > best.max_rows:
            best = RowPlan(min_rows, max_rows)
    return best


def _agrees(matmul: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, reference: torch.Tensor, rows: int) -> bool:
    starts = list(range(0, x.shape[0] - rows + 1, rows))[:_PROBE_WINDOWS]
    return all(torch.equal(matmul(x[s : s + rows]), reference[s : s + rows]) for s in starts)


def machine_key(device: torch.device | str) -> str:
    """What kernel choice depends on besides the shape: the library build, the device and its
    instruction set, and the number of threads a call is split over."""
    device = torch.device(device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{_cpu_model()} {torch.backends.cpu.get_cpu_capability()} threads={torch.get_num_threads()}"
    return f"torch {torch.__version__} {where}"


def _cpu_model() -> str:
    info = cpu_info()
    return f"{info.model_name} [flags {hashlib.sha1(' '.join(info.flags).encode()).hexdigest()[:12]}]"


def probe_model(model: torch.nn.Module, cache_file: Path | None = None) -> dict[str, RowPlan]:
    """Set the `row_plan` of every `PackedLinear` in `model`, probing each kind of linear (class,
    shape, dtype, bias) once; return the plans by kind. With `cache_file`, plans found on an
    earlier start on the same machine (`machine_key`) are read from it instead of probed."""
    from .model import PackedLinear  # the model imports this module

    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if not linears:
        return {}
    machine = machine_key(linears[0].weight_device())
    stored = _read_cache(cache_file).get(machine, {}) if cache_file else {}
    plans: dict[str, RowPlan] = {}
    for linear in linears:
        kind = linear.kind()
        if kind not in plans:
            if kind in stored:
                plans[kind] = RowPlan(*stored[kind])
            else:
                dtype, device = linear.activation_dtype(), linear.weight_device()
                with torch.inference_mode():
                    plans[kind] = probe(linear.matmul, linear.in_features, dtype, device)
                log.info("row plan of %s: %d to %d rows per call", kind, plans[kind].min_rows, plans[kind].max_rows)
        linear.row_plan = plans[kind]
    if cache_file and any(kind not in stored for kind in plans):
        _write_cache(cache_file, machine, {k: [p.min_rows, p.max_rows] for k, p in plans.items()})
    return plans


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, machine: str, plans: dict) -> None:
    data = _read_cache(path)
    data.setdefault(machine, {}).update(plans)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache only costs the probe at the next start
        log.warning("cannot store row plans in %s: %s", path, exc)
