"""Aggregate throughput with and without speculation, c requests in flight, repeated and interleaved.

    python scripts/batch_throughput.py [--concurrency 1,2,4,8,16,32] [--max-new-tokens 64] \\
        [--methods pld:bc10,hybrid:bc30,esp:bc30] [--repeats 3] [--json out/batch.json] \\
        [--model M] [--dtype bfloat16] [--quantization w8a8] [--threads 2]

Engine-level (no HTTP), one engine configured as esp-serve configures its own (load-adaptive
speculation, prefix caching), so the tuner's state carries from level to level as in a server.
At each level the same prompts run once untimed (so every configuration then finds the same
prompts in the prefix cache), then every configuration runs `--repeats` times, interleaved and in
a rotating order, so that drift in the machine's speed touches all alike. Reported per level and
method: mean output tokens/s, and the ratio to `ar` of the same round (mean, min, max).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from esp_bench.common import load_prompts, prompt_ids, round_robin, utc_now, write_json
from esp_engine.config import QUANTIZATION_METHODS, SamplingParams, SpecConfig
from esp_engine.engine import LLMEngine
from esp_engine.loader import load_model
from esp_engine.scheduler import SchedulerConfig

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    parser.add_argument("--concurrency", default="1,2,4,8,16,32")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=0,
                        help="prompts per run (default: 2 x concurrency, at least 13), round robin over the categories")
    parser.add_argument("--methods", default="pld:bc10,hybrid:bc30,esp:bc30")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load-adaptive", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--quantization", default="none", choices=QUANTIZATION_METHODS)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    loaded = load_model(args.model, dtype=args.dtype, quantization=args.quantization, num_threads=args.threads)
    prompts = [prompt_ids(loaded.tokenizer, p.text) for p in round_robin(load_prompts(args.prompts))[:64]]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    engine = LLMEngine(loaded, scheduler_config=SchedulerConfig(load_adaptive=args.load_adaptive,
                                                                enable_prefix_caching=True))
    engine.generate(prompts[0], SamplingParams(max_new_tokens=8), SpecConfig(method="ar"))  # warm up

    def run(spec: SpecConfig, batch: list[list[int]], concurrency: int) -> float:
        """Output tokens/s over `batch` with `concurrency` requests kept in flight."""
        queue = list(batch)
        start = time.perf_counter()
        tokens = in_flight = 0
        while queue or in_flight:
            while queue and in_flight < concurrency:
                engine.add_request(queue.pop(0), params, spec)
                in_flight += 1
            for out in engine.step():
                tokens += len(out.new_token_ids)
                in_flight -= 1 if out.finished else 0
        return tokens / (time.perf_counter() - start)

    configs = [("ar", SpecConfig(method="ar"))]
    for item in args.methods.split(","):
        method, _, preset = item.partition(":")
        configs.append((item, SpecConfig.from_preset(method, preset or None)))
    levels = []
    print(f"{args.max_new_tokens} tokens per request, {args.repeats} interleaved rounds per level")
    print("| concurrency | prompts | method | tok/s (mean) | vs ar (mean) | vs ar (min-max) |")
    print("|---:|---:|---|---:|---:|---:|")
    for n in (int(c) for c in args.concurrency.split(",")):
        batch = prompts[: args.num_prompts or max(13, 2 * n)]
        run(configs[0][1], batch, n)  # untimed: fills the prefix cache with these prompts
        rates: dict[str, list[float]] = {name: [] for name, _ in configs}
        for r in range(args.repeats):
            order = configs[r % len(configs):] + configs[: r % len(configs)]
            for name, spec in order:
                rates[name].append(run(spec, batch, n))
        level = {"concurrency": n, "prompts": len(batch), "methods": {}}
        for name, _ in configs:
            ratios = [x / a for x, a in zip(rates[name], rates["ar"])]
            level["methods"][name] = {"tokens_per_s": rates[name], "ratio_to_ar": ratios}
            print(f"| {n} | {len(batch)} | {name} | {statistics.mean(rates[name]):.1f} | "
                  f"{statistics.mean(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f} |", flush=True)
        levels.append(level)
    if args.json_path:
        write_json(args.json_path, {"date": utc_now(), "max_new_tokens": args.max_new_tokens,
                                    "repeats": args.repeats, "levels": levels})


if __name__ == "__main__":
    main()
