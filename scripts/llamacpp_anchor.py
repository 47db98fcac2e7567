"""Our plain decoding against llama.cpp's tg benchmark, alternated in pairs on one machine.

    python scripts/llamacpp_anchor.py --llama-bench PATH/llama-bench --gguf FILE.gguf \\
        --model smollm2-135m-instruct --dtype bfloat16 [--tokens 128] [--rounds 5] [--threads 2]

Each round runs `llama-bench -p 0 -n TOKENS -r 1` once and then our one-row passes over the same
positions (0 to TOKENS-1, from an empty cache, the LM head and the greedy choice included, as
llama-bench's token generation does), so a machine whose speed drifts moves both sides of a pair.
Prints tokens/s of each per round and the ratio ours / llama.cpp of each pair, then their medians.
Our side is the model's pass alone, without the server's scheduler.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import torch

from esp_engine.config import QUANTIZATION_METHODS
from esp_engine.kv_cache import KVCache
from esp_engine.loader import load_model


def llama_bench_tps(binary: str, gguf: str, tokens: int, threads: int) -> float:
    out = subprocess.run([binary, "-m", gguf, "-t", str(threads), "-p", "0", "-n", str(tokens), "-r", "1", "-o", "jsonl"],
                         check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip().startswith("{")]
    return float(rows[-1]["avg_ts"])


@torch.inference_mode()
def ours_tps(model, tokens: int) -> float:
    s = model.shape
    cache = KVCache.standalone(s.num_layers, s.num_kv_heads, s.head_dim, tokens, model.dtype, model.device)
    token = torch.tensor([1])
    start = time.perf_counter()
    for pos in range(tokens):
        hidden = model(cache, model.embed(token), torch.tensor([pos]), None)
        token = model.logits(hidden).argmax(-1)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-bench", required=True)
    parser.add_argument("--gguf", required=True, help="the GGUF file llama.cpp decodes")
    parser.add_argument("--model", required=True, help="what we decode (a name, a directory or a GGUF file)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--quantization", default="none", choices=QUANTIZATION_METHODS)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    loaded = load_model(args.model, dtype=args.dtype, quantization=args.quantization, num_threads=args.threads)
    ours_tps(loaded.model, args.tokens)  # warm-up, as llama-bench does one
    print(f"# {loaded.name} {loaded.dtype} quantization {loaded.quantization}, {torch.get_num_threads()} threads, "
          f"tg{args.tokens}, against llama.cpp on {args.gguf}")
    print("| round | llama.cpp tok/s | ours tok/s | ours / llama.cpp |")
    print("|---:|---:|---:|---:|")
    ratios, theirs_all, ours_all = [], [], []
    for r in range(args.rounds):
        theirs = llama_bench_tps(args.llama_bench, args.gguf, args.tokens, args.threads)
        ours = ours_tps(loaded.model, args.tokens)
        ratios.append(ours / theirs)
        theirs_all.append(theirs)
        ours_all.append(ours)
        print(f"| {r + 1} | {theirs:.1f} | {ours:.1f} | {ours / theirs:.2f}x |", flush=True)
    print(f"| median | {statistics.median(theirs_all):.1f} | {statistics.median(ours_all):.1f} | "
          f"{statistics.median(ratios):.2f}x |")


if __name__ == "__main__":
    main()
