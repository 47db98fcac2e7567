"""`esp-bench run` (or plain `esp-bench`): speed and acceptance of the speculative methods on
Spec-Bench prompts, in this process (no server).

    esp-bench run --model smollm2-135m-instruct --method ar,esp,pld:bc60 --preset bc30 \\
        --prompts ../shared/data/spec_bench/question.jsonl --max-new-tokens 128 \\
        --per-category 5 --check-lossless --json out.json

Every method runs greedily on the same prompts in one process (the model is loaded once).
Runs are interleaved per prompt (prompt 1 for every method, then prompt 2, ...) so that drift
in machine load touches all methods alike.

Metrics, pooled over prompts (sum over sum, not a mean of ratios):
  tau           tokens committed by decode passes / decode passes. The prefill pass and the
                token it yields are excluded; the bonus token of every pass (and an EOS it
                commits) is included. Plain decoding has tau 1.0.
  tokens_per_s  new tokens / wall seconds of the whole requests (prefill included).
  new_tokens    generated tokens, EOS not counted.
  forward_calls model forward passes, prefill included.
  exact_match   with --check-lossless: fraction of prompts whose output ids equal plain `ar`'s.

`esp-bench serve ...` is the serving benchmark (esp_bench/serve_bench.py): it drives a running
server over HTTP instead of loading a model.

`--plot out.png` also draws the report (tau and speedup per category; esp_bench/plots.py).

Method `hf` is an external baseline: transformers' own `model.generate()` on the same
weights (greedy, no speculation); its forward calls are its generated tokens and its tau 1.0.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

from esp_engine.config import METHODS, QUANTIZATION_METHODS, SamplingParams, SpecConfig, preset_names
from esp_engine.errors import EngineError, InvalidSpecConfigError

from . import plots
from .common import BenchError, Prompt, fmt, grid, load_prompts, prompt_ids, utc_now, write_json

HF_METHOD = "hf"
BENCH_METHODS = (*METHODS, HF_METHOD)


# ---- what to run --------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One benchmarked configuration: a method and its preset."""

    method: str
    preset: str | None
    spec: SpecConfig | None  # None for the `hf` baseline

    @property
    def label(self) -> str:
        return self.method if self.preset is None else f"{self.method}:{self.preset}"

    def settings(self) -> dict[str, Any]:
        if self.spec is None:
            return {"method": HF_METHOD, "implementation": "transformers.generate", "do_sample": False}
        return self.spec.to_dict()


def parse_methods(text: str, default_preset: str | None) -> list[RunSpec]:
    """`"ar,esp:bc60,pld"` -> one RunSpec per item; an item's own preset overrides the default."""
    runs: list[RunSpec] = []
    seen: set[str] = set()
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise BenchError("--method is empty; give one or more of " + ", ".join(BENCH_METHODS))
    for item in items:
        if not item:
            continue
        method, sep, preset = item.partition(":")
        method, preset = method.strip().lower(), preset.strip()
        if sep and not preset:
            raise BenchError(f"method item {item!r} has an empty preset after ':'")
        run = make_run(method, preset or default_preset)
        if run.label not in seen:
            seen.add(run.label)
            runs.append(run)
    return runs


def make_run(method: str, preset: str | None) -> RunSpec:
    if method not in BENCH_METHODS:
        raise BenchError(f"unknown method {method!r}; choose from {', '.join(BENCH_METHODS)}")
    if method in ("ar", HF_METHOD):  # no presets: plain decoding
        return RunSpec(method, None, SpecConfig.from_preset("ar") if method == "ar" else None)
    preset = preset or "bc30"
    if preset not in preset_names(method):
        raise BenchError(
            f"unknown preset {preset!r} for method {method!r}; choose from {', '.join(preset_names(method))}"
        )
    try:
        return RunSpec(method, preset, SpecConfig.from_preset(method, preset))
    except InvalidSpecConfigError as exc:  # pragma: no cover - preset_names and from_preset agree
        raise BenchError(str(exc)) from exc


# ---- measurements -------------------------------------------------------------------------
@dataclass
class PromptResult:
    question_id: Any
    category: str
    output_ids: list[int]
    finish_reason: str
    new_tokens: int
    forward_calls: int
    decode_calls: int
    decode_tokens: int
    wall_s: float

    def to_dict(self, exact: bool | None) -> dict[str, Any]:
        return {
            "question_id": self.question_id,
            "category": self.category,
            "new_tokens": self.new_tokens,
            "forward_calls": self.forward_calls,
            "decode_calls": self.decode_calls,
            "decode_tokens": self.decode_tokens,
            "wall_s": round(self.wall_s, 6),
            "finish_reason": self.finish_reason,
            "exact_match": exact,
            "output_ids": self.output_ids,
        }


def pooled(results: Sequence[PromptResult]) -> dict[str, Any]:
    decode_calls = sum(r.decode_calls for r in results)
    decode_tokens = sum(r.decode_tokens for r in results)
    new_tokens = sum(r.new_tokens for r in results)
    wall = sum(r.wall_s for r in results)
    return {
        "tau": decode_tokens / decode_calls if decode_calls else None,
        "tokens_per_s": new_tokens / wall if wall > 0 else None,
        "new_tokens": new_tokens,
        "forward_calls": sum(r.forward_calls for r in results),
        "wall_s": wall,
    }


class Runner:
    """Runs one RunSpec on one prompt; owns the engine and (lazily) the transformers model."""

    def __init__(self, loaded: Any, max_new_tokens: int) -> None:
        from esp_engine.engine import LLMEngine

        self.loaded = loaded
        self.engine = LLMEngine(loaded)
        self.sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        self._hf: Any = None

    def check(self, prompt: Prompt) -> None:
        """Raise the engine's own error now for a prompt it would refuse (too long for the context
        with max_new_tokens), not after the other prompts have run."""
        try:
            self.engine.abort_request(self.engine.add_request(prompt.ids, self.sampling, SpecConfig(method="ar")))
        except EngineError as exc:
            raise BenchError(f"question {prompt.question_id}: {exc}") from exc

    def run(self, run: RunSpec, prompt: Prompt) -> PromptResult:
        if run.spec is None:
            return self._run_hf(prompt)
        res = self.engine.generate(prompt.ids, self.sampling, run.spec)
        return PromptResult(prompt.question_id, prompt.category, list(res.output_ids), res.finish_reason,
                            len(res.output_ids), res.num_decode_calls + 1, res.num_decode_calls,
                            res.num_decode_tokens, res.wall_s)

    def hf_model(self) -> Any:
        if self._hf is None:
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.loaded.source, dtype=self.loaded.dtype)
            model.to(self.loaded.device)
            model.eval()
            gc = model.generation_config
            for name in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
                if hasattr(gc, name):  # greedy: silence "flag is ignored" warnings
                    setattr(gc, name, None)
            self._hf = model
            self._torch = torch
        return self._hf

    def _run_hf(self, prompt: Prompt) -> PromptResult:
        model = self.hf_model()
        torch = self._torch
        eos = list(self.loaded.eos_token_ids)
        start = time.perf_counter()
        with torch.inference_mode():
            input_ids = torch.tensor([prompt.ids], device=self.loaded.device)
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=self.sampling.max_new_tokens,
                eos_token_id=eos or None,
                pad_token_id=eos[0] if eos else None,
            )
            generated = out[0, input_ids.shape[1]:].tolist()
        wall = time.perf_counter() - start
        output, finish = generated, "length"
        for i, token in enumerate(generated):
            if token in eos:
                output, finish = generated[:i], "stop"
                generated = generated[: i + 1]
                break
        calls = len(generated)  # one forward pass per generated token (the first is the prefill)
        return PromptResult(prompt.question_id, prompt.category, output, finish, len(output), calls,
                            max(calls - 1, 0), max(calls - 1, 0), wall)


# ---- the report ---------------------------------------------------------------------------
def machine_info(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": utc_now(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def build_report(runs: list[RunSpec], results: dict[str, list[PromptResult]], reference: list[PromptResult] | None,
                 loaded: Any, machine: dict[str, Any], command: str) -> list[dict[str, Any]]:
    categories = list(dict.fromkeys(r.category for r in next(iter(results.values()))))
    ar_summary = pooled(results["ar"]) if "ar" in results else None
    report = []
    for run in runs:
        rows = results[run.label]
        exact = [r.output_ids == ref.output_ids for r, ref in zip(rows, reference)] if reference else None
        summary = pooled(rows)
        summary["exact_match"] = sum(exact) / len(exact) if exact else None
        summary["n"] = len(rows)
        ar_tps = ar_summary["tokens_per_s"] if ar_summary else None
        summary["speedup_vs_ar"] = summary["tokens_per_s"] / ar_tps if ar_tps and summary["tokens_per_s"] else None
        per_category = {}
        for cat in categories:
            idx = [i for i, r in enumerate(rows) if r.category == cat]
            stats = pooled([rows[i] for i in idx])
            per_category[cat] = {
                "tau": stats["tau"],
                "tokens_per_s": stats["tokens_per_s"],
                "n": len(idx),
                "exact_match": sum(exact[i] for i in idx) / len(idx) if exact else None,
            }
        report.append({
            "model": loaded.name,
            "method": run.method,
            "preset": run.preset,
            "settings": run.settings(),
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "quantization": getattr(loaded, "quantization", "none"),
            "summary": summary,
            "per_category": per_category,
            "prompts": [r.to_dict(exact[i] if exact else None) for i, r in enumerate(rows)],
            "machine": machine,
            "command": command,
        })
    return report


def format_table(report: list[dict[str, Any]]) -> str:
    head = ["method", "preset", "tau", "tok/s", "speedup", "new tok", "fwd calls", "wall s", "exact"]
    body = []
    for entry in report:
        s = entry["summary"]
        body.append([entry["method"], entry["preset"] or "-", fmt(s["tau"], ".2f"), fmt(s["tokens_per_s"], ".1f"),
                     fmt(s["speedup_vs_ar"], ".2f") + ("x" if s["speedup_vs_ar"] is not None else ""),
                     str(s["new_tokens"]), str(s["forward_calls"]), fmt(s["wall_s"], ".2f"),
                     fmt(s["exact_match"], ".3f")])
    lines = [grid(head, body)]
    categories = list(report[0]["per_category"]) if report else []
    if categories:
        head2 = ["category", "n"] + [
            f"{e['method']}{':' + e['preset'] if e['preset'] else ''} tau | tok/s" for e in report
        ]
        body2 = []
        for cat in categories:
            row = [cat, str(report[0]["per_category"][cat]["n"])]
            for entry in report:
                c = entry["per_category"][cat]
                row.append(f"{fmt(c['tau'], '.2f')} | {fmt(c['tokens_per_s'], '.1f')}")
            body2.append(row)
        lines += ["", "per category:", grid(head2, body2)]
    return "\n".join(lines)


# ---- the command --------------------------------------------------------------------------
DESCRIPTION = "Benchmark speculative decoding methods (greedy) on Spec-Bench prompts, in this process."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="GGUF file, embedded model name, local HF directory or cached hub id")
    p.add_argument("--method", default="esp",
                   help=f"comma list of {', '.join(BENCH_METHODS)}; an item may name its preset, e.g. esp:bc60")
    p.add_argument("--preset", default="bc30", help="preset for items without their own (bc10, bc30, bc60, ...)")
    p.add_argument("--prompts", required=True, help="Spec-Bench question.jsonl")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--per-category", type=int, default=0, help="first N prompts of each category (0 = all)")
    p.add_argument("--limit", type=int, default=0, help="at most N prompts in all (0 = no cap)")
    p.add_argument("--check-lossless", action="store_true",
                   help="also run plain ar and report the fraction of outputs identical to it")
    p.add_argument("--warmup", type=int, default=1, help="untimed warmup generations per method")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None,
                   help="auto (the default): bfloat16 where the device computes it natively (a GPU, a CPU with "
                        "amx_bf16 or avx512_bf16), else float32; or float32, bfloat16, float16")
    p.add_argument("--quantization", default="none", choices=QUANTIZATION_METHODS,
                   help="int8/int4/w8a8 linears (CPU; see esp-serve --help); the hf baseline stays unquantized")
    p.add_argument("--json", dest="json_path", default=None, help="write the full results here")
    plots.add_plot_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace, command: str) -> int:
    """Run the benchmark `args` describe; `command` is recorded in the report. Raises BenchError
    for a usage error (the engine's refusals included)."""
    try:
        return _bench(args, command)
    except EngineError as exc:
        raise BenchError(str(exc)) from exc


def _bench(args: argparse.Namespace, command: str) -> int:
    if args.max_new_tokens < 1:
        raise BenchError("--max-new-tokens must be at least 1")
    if args.per_category < 0 or args.limit < 0 or args.warmup < 0:
        raise BenchError("--per-category, --limit and --warmup must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise BenchError("--threads must be at least 1")
    runs = parse_methods(args.method, args.preset)
    if args.plot:
        plots.require_matplotlib()
    prompts = load_prompts(args.prompts, args.per_category or None, args.limit or None)
    labels = [r.label for r in runs]
    if args.check_lossless and "ar" not in labels:
        runs.insert(0, make_run("ar", None))
        labels.insert(0, "ar")

    import torch
    from tqdm import tqdm

    from esp_engine.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, num_threads=args.threads,
                        quantization=args.quantization)
    runner = Runner(loaded, args.max_new_tokens)
    for prompt in prompts:
        prompt.ids = prompt_ids(loaded.tokenizer, prompt.text)
        runner.check(prompt)
    machine = machine_info(str(loaded.device))

    total = len(runs) * (args.warmup + len(prompts))
    results: dict[str, list[PromptResult]] = {label: [] for label in labels}
    interrupted = False
    with tqdm(total=total, desc="esp-bench", unit="gen", file=sys.stderr, disable=args.no_progress,
              dynamic_ncols=True) as bar:
        for spec in runs:  # untimed: JIT/oneDNN packing, allocator, lazy HF load
            for i in range(args.warmup):
                bar.set_postfix_str(f"warmup {spec.label}")
                runner.run(spec, prompts[i % len(prompts)])
                bar.update()
        try:
            for prompt in prompts:  # interleaved: every method on prompt 1, then prompt 2, ...
                for spec in runs:
                    bar.set_postfix_str(f"{spec.label} q{prompt.question_id}")
                    results[spec.label].append(runner.run(spec, prompt))
                    bar.update()
        except KeyboardInterrupt:  # report the prompts every method finished
            done = min(len(rows) for rows in results.values())
            if not done:
                print("esp-bench: interrupted before any prompt finished", file=sys.stderr)
                return 130
            print(f"esp-bench: interrupted; reporting the {done} prompts every method finished", file=sys.stderr)
            results = {label: rows[:done] for label, rows in results.items()}
            prompts, interrupted = prompts[:done], True

    reference = results["ar"] if args.check_lossless else None
    report = build_report(runs, results, reference, loaded, machine, command)
    print(f"model {loaded.name} on {loaded.device} ({str(loaded.dtype).removeprefix('torch.')}, "
          f"quantization {getattr(loaded, 'quantization', 'none')}), "
          f"{len(prompts)} prompts, max_new_tokens {args.max_new_tokens}, torch threads {torch.get_num_threads()}"
          + (" (interrupted)" if interrupted else ""))
    print(format_table(report))
    if args.json_path:
        print(f"results written to {write_json(args.json_path, report)}")
    if args.plot:
        print(f"plot written to {plots.plot_run(report, args.plot)}")
    return 130 if interrupted else 0
