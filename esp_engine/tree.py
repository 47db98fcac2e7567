"""Draft trees and the layout of one speculative block: rows, position offsets, attention.

A block is `[root | draft nodes | k masks per tree row | lookahead window]`. Row 0 is the root
(the last committed token, not yet cached), rows 1..N the draft nodes with parents before
children. The layout depends only on the tree's shape, so it is built once per shape and
cached: the paper lost most of ESP's gain rebuilding it every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch


@dataclass(slots=True)
class DraftTree:
    """Draft nodes under the root. `parents[i]` is the row of node i+1's parent (0 = root)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert len(self.tokens) == len(self.parents)
        for i, p in enumerate(self.parents):
            assert 0 <= p <= i, f"node {i + 1} has parent {p}: parents must come first"

    @property
    def num_nodes(self) -> int:
        return len(self.tokens)

    def add(self, parent_row: int, token: int) -> int:
        """Add `token` under `parent_row` unless that child exists; return the child's row."""
        for i, (p, t) in enumerate(zip(self.parents, self.tokens)):
            if p == parent_row and t == token:
                return i + 1
        self.tokens.append(token)
        self.parents.append(parent_row)
        return len(self.tokens)

    def add_chain(self, parent_row: int, tokens: list[int], budget: int) -> int:
        """Insert a chain under `parent_row`, sharing existing prefixes; stop at `budget` nodes."""
        row = parent_row
        for t in tokens:
            existing = self.child(row, t)
            if existing is None:
                if self.num_nodes >= budget:
                    break
                existing = self.add(row, t)
            row = existing
        return row

    def child(self, parent_row: int, token: int) -> int | None:
        for i, (p, t) in enumerate(zip(self.parents, self.tokens)):
            if p == parent_row and t == token:
                return i + 1
        return None

    def children_map(self) -> list[dict[int, int]]:
        """children[row] = {token: child_row} for every tree row (root included)."""
        children: list[dict[int, int]] = [{} for _ in range(self.num_nodes + 1)]
        for i, (p, t) in enumerate(zip(self.parents, self.tokens)):
            children[p].setdefault(t, i + 1)
        return children


@dataclass(frozen=True, slots=True)
class BlockLayout:
    """Everything about a block that depends only on its shape.

    Row order: tree rows [0, T), then masks (owner b's mask j at T + b*k + j-1), then the
    lookahead window (row r, column c at L0 + r*W + c).
    """

    num_tree_rows: int  # T = 1 + N
    num_masks: int  # k
    lookahead: tuple[int, int]  # (rows R, columns W) of a LADE window, (0, 0) if none
    offsets: torch.Tensor  # [M] int64: position of each row minus the root's position
    attn: torch.Tensor  # [M, M] bool: row i may attend to block row j
    mask_rows: torch.Tensor  # [T*k] int64: rows fed the mask embedding

    @property
    def num_rows(self) -> int:
        return int(self.offsets.shape[0])

    @property
    def lookahead_start(self) -> int:
        return self.num_tree_rows * (1 + self.num_masks)

    def owner_mask_rows(self, owner: int) -> slice:
        start = self.num_tree_rows + owner * self.num_masks
        return slice(start, start + self.num_masks)

    def lookahead_row(self, r: int) -> slice:
        rows, cols = self.lookahead
        start = self.lookahead_start + r * cols
        return slice(start, start + cols)


def block_layout(parents: tuple[int, ...], num_masks: int, lookahead: tuple[int, int] = (0, 0)) -> BlockLayout:
    return _block_layout_cached(tuple(parents), num_masks, tuple(lookahead))


@lru_cache(maxsize=4096)
def _block_layout_cached(parents: tuple[int, ...], num_masks: int, lookahead: tuple[int, int]) -> BlockLayout:
    num_tree = 1 + len(parents)
    la_rows, la_cols = lookahead
    total = num_tree * (1 + num_masks) + la_rows * la_cols
    attn = np.zeros((total, total), dtype=bool)
    offsets = np.zeros(total, dtype=np.int64)
    depths = [0] * num_tree
    # Tree rows: each sees its ancestors and itself.
    attn[0, 0] = True
    for i, p in enumerate(parents, start=1):
        depths[i] = depths[p] + 1
        attn[i] = attn[p]
        attn[i, i] = True
    offsets[:num_tree] = depths
    # Masks: mask j of owner b sees what b sees, and masks 1..j of b.
    for b in range(num_tree):
        base = num_tree + b * num_masks
        for j in range(num_masks):
            row = base + j
            attn[row] = attn[b]
            attn[row, base : row + 1] = True
            offsets[row] = depths[b] + j + 1
    # Lookahead window (LADE): row r, column c sits at root+1+r+c and sees the root,
    # the first window row up to column c, and its own column in rows 1..r.
    start = num_tree * (1 + num_masks)
    for r in range(la_rows):
        for c in range(la_cols):
            row = start + r * la_cols + c
            attn[row, 0] = True
            attn[row, start : start + c + 1] = True
            for rr in range(1, r + 1):
                attn[row, start + rr * la_cols + c] = True
            offsets[row] = 1 + r + c
    mask_rows = np.arange(num_tree, num_tree * (1 + num_masks), dtype=np.int64)
    return BlockLayout(
        num_tree_rows=num_tree,
        num_masks=num_masks,
        lookahead=lookahead,
        offsets=torch.from_numpy(offsets),
        attn=torch.from_numpy(attn),
        mask_rows=torch.from_numpy(mask_rows),
    )
