"""Aggregate throughput: the same prompts with 1, 4, 8 ... requests in flight, with and without speculation.

    python scripts/batch_throughput.py [--concurrency 1,4,8] [--max-new-tokens 64] [--methods pld:bc10,esp:bc30]

Engine-level (no HTTP): measures what batching the forward pass buys before the server's own
overheads. Prompts: the first turn of Spec-Bench questions, spread over categories.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from esp_engine.config import SamplingParams, SpecConfig
from esp_engine.engine import LLMEngine
from esp_engine.loader import load_model
from esp_engine.scheduler import SchedulerConfig

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=16, help="every level runs the same prompts")
    parser.add_argument("--methods", default="pld:bc10,hybrid:bc10,esp:bc30")
    parser.add_argument("--max-rows-per-step", type=int, default=None)
    parser.add_argument("--load-adaptive", action=argparse.BooleanOptionalAction, default=True,
                        help="speculative methods size their trees from measured step cost (as esp-serve does)")
    args = parser.parse_args()
    loaded = load_model(args.model)
    questions = [json.loads(line) for line in open(args.prompts) if line.strip()]
    prompts = []
    for q in questions[:: max(1, len(questions) // 32)]:
        ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}],
                                                   add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if not isinstance(ids, list) else ids))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    plain = LLMEngine(loaded)
    adaptive = LLMEngine(loaded, scheduler_config=SchedulerConfig(
        load_adaptive=args.load_adaptive, max_rows_per_step=args.max_rows_per_step))
    for engine in (plain, adaptive):
        engine.generate(prompts[0], SamplingParams(max_new_tokens=8), SpecConfig(method="ar"))  # warm up

    def run(engine: LLMEngine, spec: SpecConfig, concurrency: int) -> float:
        """Tokens/s over all prompts with `concurrency` requests kept in flight."""
        queue = list(prompts[: args.num_prompts])
        start = time.perf_counter()
        tokens = 0
        while queue or engine.has_unfinished():
            while queue and len(engine.sequences) < concurrency:
                engine.add_request(queue.pop(0), params, spec)
            tokens += sum(len(out.new_token_ids) for out in engine.step())
        return tokens / (time.perf_counter() - start)

    ar = SpecConfig(method="ar")
    solo = run(plain, ar, 1)
    print(f"{args.num_prompts} prompts, {args.max_new_tokens} tokens each; ar one at a time: {solo:.1f} tok/s")
    print("| concurrency | method | tok/s | vs ar one at a time | vs ar at this concurrency |")
    print("|---:|---|---:|---:|---:|")
    for n in (int(c) for c in args.concurrency.split(",")):
        base = run(plain, ar, n)
        print(f"| {n} | ar | {base:.1f} | {base / solo:.2f}x | 1.00x |", flush=True)
        for item in args.methods.split(","):
            method, _, preset = item.partition(":")
            rate = run(adaptive, SpecConfig.from_preset(method, preset or None), n)
            print(f"| {n} | {item} | {rate:.1f} | {rate / solo:.2f}x | {rate / base:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
