"""Aggregate decode throughput: N requests one at a time vs. together in batched passes.

    python scripts/batch_throughput.py [--concurrency 8] [--max-new-tokens 64] [--methods ar,pld:bc10]

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

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--methods", default="ar,pld:bc10,hybrid:bc10,esp:bc10")
    parser.add_argument("--max-rows-per-step", type=int, default=None)
    args = parser.parse_args()
    loaded = load_model(args.model)
    questions = [json.loads(line) for line in open(args.prompts) if line.strip()]
    prompts = []
    for q in questions[:: max(1, len(questions) // 32)]:
        ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}],
                                                   add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if not isinstance(ids, list) else ids))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    engine = LLMEngine(loaded, max_rows_per_step=args.max_rows_per_step)
    engine.generate(prompts[0], SamplingParams(max_new_tokens=8), SpecConfig(method="ar"))  # warm up
    print("| method | concurrency | one at a time tok/s | batched tok/s | gain |")
    print("|---|---:|---:|---:|---:|")
    for item in args.methods.split(","):
        method, _, preset = item.partition(":")
        spec = SpecConfig.from_preset(method, preset or None)
        for n in (int(c) for c in args.concurrency.split(",")):
            batch = prompts[:n]
            start = time.perf_counter()
            tokens = sum(len(engine.generate(p, params, spec).output_ids) for p in batch)
            solo = tokens / (time.perf_counter() - start)
            start = time.perf_counter()
            for p in batch:
                engine.add_request(p, params, spec)
            tokens = 0
            while engine.has_unfinished():
                tokens += sum(len(out.new_token_ids) for out in engine.step())
            batched = tokens / (time.perf_counter() - start)
            print(f"| {item} | {n} | {solo:.1f} | {batched:.1f} | {batched / solo:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
