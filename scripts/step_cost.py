"""Print the forward-pass cost curve: milliseconds per pass by block rows.

    python scripts/step_cost.py [--model smollm2-135m-instruct] [--context 256] [--repeats 5]

This is what decides tree sizes on a given machine (see esp_engine/cost_model.py).
"""

from __future__ import annotations

import argparse
import platform

import torch

from esp_engine.config import QUANTIZATION_METHODS
from esp_engine.cost_model import StepCostModel
from esp_engine.loader import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--quantization", default="none", choices=QUANTIZATION_METHODS)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", default="1,2,4,6,8,10,12,16,20,24,30,40,60")
    args = parser.parse_args()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization,
                        num_threads=args.threads)
    rows = tuple(int(r) for r in args.rows.split(","))
    costs = StepCostModel.measure(loaded.model, rows=rows, context=args.context, repeats=args.repeats)
    print(f"# {loaded.name} {loaded.dtype} quantization {loaded.quantization} on {loaded.device}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, context {args.context}")
    print("| rows | ms per pass | vs 1 row |")
    print("|---:|---:|---:|")
    for n, s in zip(costs.rows, costs.seconds):
        print(f"| {n} | {s * 1000:.1f} | {s / costs.seconds[0]:.2f}x |")


if __name__ == "__main__":
    main()
