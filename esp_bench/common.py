"""What the benchmarks and scripts share: Spec-Bench prompts, their token ids, tables, JSON reports."""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from esp_engine.chat import render_chat


class BenchError(Exception):
    """A usage error: reported on stderr with exit code 2."""


# ---- prompts ------------------------------------------------------------------------------
@dataclass
class Prompt:
    question_id: Any
    category: str
    text: str
    ids: list[int] = field(default_factory=list)


def load_prompts(path: str | os.PathLike, per_category: int | None = None, limit: int | None = None) -> list[Prompt]:
    """Read a Spec-Bench jsonl (question_id, category, turns); keep the first turn of each.

    `per_category` keeps the first N of each category, then `limit` the first N of what is left.
    """
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"prompts file not found: {path}")
    prompts: list[Prompt] = []
    counts: dict[str, int] = {}
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
                turns = row["turns"]
                text = turns[0] if isinstance(turns, list) else turns
                if not isinstance(text, str):
                    raise TypeError("the first turn is not a string")
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise BenchError(f"{path}:{lineno}: not a Spec-Bench question ({exc})") from exc
            category = str(row.get("category", "default"))
            if per_category and counts.get(category, 0) >= per_category:
                continue
            counts[category] = counts.get(category, 0) + 1
            prompts.append(Prompt(row.get("question_id", lineno), category, text))
    if limit:
        prompts = prompts[:limit]
    if not prompts:
        raise BenchError(f"no prompts selected from {path}")
    return prompts


def round_robin(prompts: Sequence[Prompt]) -> list[Prompt]:
    """The first of every category, then the second of every category, ...: any first k prompts
    spread over all categories (Spec-Bench's file lists them category by category)."""
    by_category: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        by_category.setdefault(prompt.category, []).append(prompt)
    rounds = max((len(group) for group in by_category.values()), default=0)
    return [group[i] for i in range(rounds) for group in by_category.values() if i < len(group)]


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of one user turn as the server's chat endpoint renders it; a model without a chat
    template gets the plain text, as the completions endpoint encodes it."""
    if getattr(tokenizer, "chat_template", None):
        return render_chat(tokenizer, [{"role": "user", "content": text}])
    return list(tokenizer.encode(text))


# ---- reports ------------------------------------------------------------------------------
def fmt(value: Any, spec: str) -> str:
    """`value` formatted with `spec`, or "-" for a value that is not known."""
    return "-" if value is None else format(value, spec)


def grid(head: list[str], body: list[list[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(r) for r in body)])


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as indented JSON, creating the folder; returns the path written."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return out
