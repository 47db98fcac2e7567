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

from collections.abc import Callable
from dataclasses import dataclass

import torch


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
