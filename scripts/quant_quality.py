"""Weight-only quantization against the unquantized model: logit agreement and pass cost.

    python scripts/quant_quality.py --model smollm2-135m-instruct --dtype bfloat16 \\
        --prompts ../shared/data/spec_bench/question.jsonl --per-category 1 --limit 6 --max-new-tokens 32

The unquantized model (in --dtype) answers each prompt greedily; every variant then reads the same
tokens (prompt and answer, teacher-forced) and is compared position by position over the answer:
top-1 agreement, the mean correlation of the logit rows and the mean KL(unquantized || quantized).
Variants: int8, int8 with the LM head left unquantized (`quantize_model(lm_head=False)`), int4
(its head is int8), int4 with a dense head, w8a8 (int8 activations too; CPUs with AVX512-VNNI). Then the cost of one pass at --rows (best of
--repeats after 256 cached tokens, `StepCostModel.measure`), the linears' weight bytes and the
time quantization took. Row plans are not probed: the quantized kernels are row-invariant.
"""

from __future__ import annotations

import argparse
import gc
import platform
import time

import torch

from esp_bench.common import load_prompts, prompt_ids
from esp_engine.config import SamplingParams, SpecConfig
from esp_engine.cost_model import StepCostModel
from esp_engine.engine import LLMEngine
from esp_engine.kv_cache import KVCache
from esp_engine.loader import load_model
from esp_engine.quantization import quantize_model

VARIANTS = {"int8": ("int8", True), "int8-dense-head": ("int8", False), "int4": ("int4", True),
            "int4-dense-head": ("int4", False), "w8a8": ("w8a8", True)}


def sequence_logits(model, ids: list[int]) -> torch.Tensor:
    s = model.shape
    cache = KVCache.standalone(s.num_layers, s.num_kv_heads, s.head_dim, len(ids), model.dtype, model.device)
    return model.logits(model(cache, model.embed(torch.tensor(ids)), torch.arange(len(ids)), None))


def compare(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float, float]:
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    r, g = ref - ref.mean(-1, keepdim=True), got - got.mean(-1, keepdim=True)
    corr = ((r * g).sum(-1) / (r.norm(dim=-1) * g.norm(dim=-1))).mean().item()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    return top1, corr, kl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompts", required=True, help="Spec-Bench question.jsonl")
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--limit", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--rows", default="1,4,10,16,32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = tuple(int(r) for r in args.rows.split(","))

    dense = load_model(args.model, device="cpu", dtype=args.dtype)
    engine = LLMEngine(dense)
    prompts = load_prompts(args.prompts, args.per_category or None, args.limit or None)
    sequences, answer_starts = [], []
    for prompt in prompts:
        ids = prompt_ids(dense.tokenizer, prompt.text)
        out = engine.generate(ids, SamplingParams(max_new_tokens=args.max_new_tokens), SpecConfig(method="ar"))
        sequences.append(ids + list(out.output_ids))
        answer_starts.append(len(ids) - 1)  # the logits at the last prompt token choose the first answer token
    reference = [sequence_logits(dense.model, s)[a:-1] for s, a in zip(sequences, answer_starts)]
    print(f"# {dense.name} {args.dtype}, {len(prompts)} prompts, {sum(r.shape[0] for r in reference)} answer "
          f"positions; {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    costs = {"none": StepCostModel.measure(dense.model, rows=rows, repeats=args.repeats).seconds}
    del engine, dense
    gc.collect()

    print("| variant | top-1 agreement | mean logit correlation | mean KL | linears MiB before -> after | "
          "quantize s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.variants.split(","):
        method, head = VARIANTS[name]
        loaded = load_model(args.model, device="cpu", dtype=args.dtype)
        t0 = time.perf_counter()
        report = quantize_model(loaded.model, method, lm_head=head)
        took = time.perf_counter() - t0
        stats = [compare(ref, sequence_logits(loaded.model, s)[a:-1])
                 for ref, s, a in zip(reference, sequences, answer_starts)]
        weights = [r.shape[0] for r in reference]
        top1, corr, kl = (sum(w * st[i] for w, st in zip(weights, stats)) / sum(weights) for i in range(3))
        print(f"| {name} | {top1:.3f} | {corr:.5f} | {kl:.4f} | {report.bytes_before / 2**20:.0f} -> "
              f"{report.bytes_after / 2**20:.0f} | {took:.1f} |", flush=True)
        costs[name] = StepCostModel.measure(loaded.model, rows=rows, repeats=args.repeats).seconds
        del loaded
        gc.collect()

    print()
    print("| rows | " + " | ".join(f"{name} ms" for name in costs) + " |")
    print("|---:|" + "---:|" * len(costs))
    for i, n in enumerate(rows):
        print(f"| {n} | " + " | ".join(f"{c[i] * 1000:.1f}" for c in costs.values()) + " |")


if __name__ == "__main__":
    main()
