"""Turn an `esp-bench --json` file into the markdown tables of docs/benchmarks.md.

    python scripts/bench_table.py out.json
"""

from __future__ import annotations

import json
import sys


def _label(run: dict) -> str:
    return run["method"] + (f":{run['preset']}" if run.get("preset") else "")


def main(path: str) -> None:
    runs = json.load(open(path))
    ar = next((r for r in runs if r["method"] == "ar"), None)
    print("| method | tau | tokens/s | speedup vs ar | new tokens | forward calls | wall s | exact match |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        s = run["summary"]
        speed = s["tokens_per_s"] / ar["summary"]["tokens_per_s"] if ar else float("nan")
        tau = f"{s['tau']:.3f}" if s["tau"] is not None else "-"
        exact = "-" if s["exact_match"] is None else f"{s['exact_match']:.3f}"
        print(f"| {_label(run)} | {tau} | {s['tokens_per_s']:.1f} | {speed:.2f}x | {s['new_tokens']} | "
              f"{s['forward_calls']} | {s['wall_s']:.1f} | {exact} |")
    categories = sorted({c for run in runs for c in run["per_category"]})
    for key, title in (("tau", "tau"), ("tokens_per_s", "tokens/s")):
        print(f"\n{title} per category\n")
        print("| method | " + " | ".join(categories) + " |")
        print("|---|" + "---:|" * len(categories))
        for run in runs:
            cells = []
            for c in categories:
                v = run["per_category"].get(c, {}).get(key)
                cells.append("-" if v is None else (f"{v:.2f}" if key == "tau" else f"{v:.1f}"))
            print(f"| {_label(run)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
