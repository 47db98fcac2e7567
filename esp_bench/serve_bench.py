"""`esp-bench serve`: latency and throughput of a running OpenAI-compatible server under load.

    esp-bench serve --base-url http://127.0.0.1:8000/v1 \\
        --prompts ../shared/data/spec_bench/question.jsonl --per-category 2 \\
        --max-tokens 128 --concurrency 1,4,16,32 --json out/serve.json

The benchmark is a client only: it drives an already-running server (esp-serve, or any other
server speaking the OpenAI API, vLLM included) through the official `openai` SDK, with streaming
chat completions (`stream_options.include_usage`) over the first turns of Spec-Bench questions
(the same jsonl and selection as `esp-bench run`; the server applies the chat template). Every
concurrency level of the sweep sends the same prompt set; at level c, c clients each take the
next prompt as soon as their previous request ends, so c requests are in flight until fewer than
c remain. An untimed warmup (`--warmup`, one request by default) runs before the sweep.

Per level, over the requests that succeeded (failed ones only count in `errors`):
  duration_s           from the first request sent to the last stream closed.
  requests_per_s       completed requests / duration_s.
  output_tokens_per_s  completion tokens (from each stream's usage chunk) / duration_s.
  ttft_s               time to first token: request sent -> first chunk with non-empty content.
  itl_s                inter-token latency, *per chunk*: the gaps between consecutive chunks with
                       content of one stream, one sample per gap (as vLLM's benchmark records it;
                       the stream does not say how many tokens a chunk holds). A speculative pass
                       commits several tokens at once and they arrive in one chunk, so with
                       speculation itl_s is the time per decode step as a client sees it.
  tpot_s               time per output token after the first, per request:
                       (e2e - ttft) / (completion_tokens - 1). This is the per-token figure:
                       speculation that commits more tokens per step lowers it.
  e2e_s                request sent -> stream closed.
  tokens_per_chunk     completion tokens / content chunks, pooled.
  p50 / p99 are linearly interpolated percentiles (numpy's default), mean the arithmetic mean.

From the server's Prometheus text (GET {server root}/metrics, scraped before and after each
level; the root is --base-url without its /v1), as deltas over the level:
  tau                  esp:tokens_committed_total / esp:forward_calls_total, summed over
                       methods: tokens committed per decode pass (1.0 for plain decoding).
  accepted_per_draft   vllm:spec_decode_num_accepted_tokens_total /
                       vllm:spec_decode_num_drafts_total (vLLM's mean acceptance length is
                       1 + this).
They count everything the server did meanwhile, so other traffic to the same server skews them;
a server without these series (or without /metrics) reports null.

`--plot out.png` also draws the sweep against concurrency (esp_bench/plots.py; `esp-bench plot`
draws several stored reports in one picture).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import plots
from .common import BenchError, Prompt, fmt, grid, load_prompts, utc_now, write_json

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
DEFAULT_CONCURRENCY = "1,4,16,32"
MAX_ERROR_MESSAGES = 5

# Sample names summed over all their series (every method) in the /metrics text.
TOKENS_COMMITTED = "esp:tokens_committed_total"
FORWARD_CALLS = "esp:forward_calls_total"
ACCEPTED_TOKENS = "vllm:spec_decode_num_accepted_tokens_total"
NUM_DRAFTS = "vllm:spec_decode_num_drafts_total"
COUNTERS = (TOKENS_COMMITTED, FORWARD_CALLS, ACCEPTED_TOKENS, NUM_DRAFTS)


@dataclass
class ServeSettings:
    """What one `esp-bench serve` run does."""

    prompts: str
    base_url: str = DEFAULT_BASE_URL
    api_key: str | None = None
    model: str | None = None  # None: the first model of /v1/models
    per_category: int = 0
    num_prompts: int = 0
    max_tokens: int = 128
    temperature: float = 0.0
    concurrency: list[int] = field(default_factory=lambda: parse_concurrency(DEFAULT_CONCURRENCY))
    spec_method: str | None = None
    spec_preset: str | None = None
    ignore_eos: bool = False
    warmup: int = 1
    timeout_s: float = 600.0
    metrics_url: str | None = None  # None: {server root}/metrics
    system_prompt: str | None = None  # sent as a system message before every prompt

    def messages(self, text: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*head, {"role": "user", "content": text}]

    def extra_body(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.spec_method:
            extra["spec_method"] = self.spec_method
        if self.spec_preset:
            extra["spec_preset"] = self.spec_preset
        if self.ignore_eos:
            extra["ignore_eos"] = True
        return extra

    def to_dict(self, num_selected: int) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "per_category": self.per_category or None,
            "num_prompts": num_selected,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "concurrency": list(self.concurrency),
            "spec_method": self.spec_method,
            "spec_preset": self.spec_preset,
            "ignore_eos": self.ignore_eos,
            "system_prompt_chars": len(self.system_prompt) if self.system_prompt else 0,
            "warmup": self.warmup,
            "metrics_url": self.resolved_metrics_url(),
            "endpoint": "chat.completions (stream, include_usage)",
        }

    def resolved_metrics_url(self) -> str:
        return self.metrics_url or server_root(self.base_url) + "/metrics"


def parse_concurrency(text: str) -> list[int]:
    """`"1,4,16"` -> [1, 4, 16]; every level a positive integer, kept in the order given."""
    levels = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            level = int(item)
        except ValueError:
            raise BenchError(f"--concurrency item {item!r} is not an integer") from None
        if level < 1:
            raise BenchError(f"--concurrency levels must be at least 1, got {level}")
        levels.append(level)
    if not levels:
        raise BenchError("--concurrency is empty; give a comma list such as 1,4,16")
    return levels


def server_root(base_url: str) -> str:
    """The server's root URL: the API base without a trailing /v1."""
    root = base_url.rstrip("/")
    return root.removesuffix("/v1")


# ---- one request --------------------------------------------------------------------------
@dataclass
class RequestResult:
    ok: bool
    e2e_s: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk, s after sending
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when the server reports it
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive content chunks (per chunk, not per token)."""
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot_s(self) -> float | None:
        """(e2e - ttft) / (completion tokens - 1): time per output token after the first."""
        if self.ttft_s is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


async def send_request(client: Any, model: str, prompt: Prompt, settings: ServeSettings) -> RequestResult:
    """One streaming chat completion; failures are returned, not raised."""
    import httpx
    import openai

    start = time.perf_counter()
    result = RequestResult(ok=False, e2e_s=0.0)
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=settings.messages(prompt.text),
            max_completion_tokens=settings.max_tokens,
            temperature=settings.temperature,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=settings.extra_body() or None,
        )
        async for chunk in stream:
            now = time.perf_counter() - start
            if any(choice.delta.content for choice in chunk.choices):
                result.chunk_times.append(now)
            if chunk.usage is not None:
                result.prompt_tokens = chunk.usage.prompt_tokens
                result.output_tokens = chunk.usage.completion_tokens
                details = getattr(chunk.usage, "prompt_tokens_details", None)
                if details is not None and details.cached_tokens is not None:
                    result.cached_tokens = details.cached_tokens
        result.ok = True
    except (openai.OpenAIError, httpx.HTTPError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.e2e_s = time.perf_counter() - start
    return result


# ---- statistics ---------------------------------------------------------------------------
def summarize(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p99 (linear interpolation) and mean; all None for no values."""
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    import numpy as np

    arr = np.asarray(values, dtype=float)
    p50, p99 = np.percentile(arr, [50, 99])
    return {"p50": float(p50), "p99": float(p99), "mean": float(arr.mean())}


def counter_totals(metrics_text: str, model: str | None = None) -> dict[str, float]:
    """The COUNTERS summed over their series (all methods) in a Prometheus text exposition.

    Series labelled with another `model_name` than `model` are left out (a server with several
    models); a counter that does not appear is absent from the result.
    """
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name not in COUNTERS:
                continue
            if model is not None and sample.labels.get("model_name", model) != model:
                continue
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def spec_stats(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any]:
    """tau and accepted-per-draft from the counters' deltas over a level (None where unknown)."""
    delta = {name: after[name] - before.get(name, 0.0) for name in COUNTERS
             if before is not None and after is not None and name in after}

    def ratio(num: str, den: str) -> float | None:
        return delta[num] / delta[den] if num in delta and delta.get(den) else None

    return {
        "tau": ratio(TOKENS_COMMITTED, FORWARD_CALLS),
        "accepted_per_draft": ratio(ACCEPTED_TOKENS, NUM_DRAFTS),
        "counter_deltas": {name.removesuffix("_total"): value for name, value in delta.items()},
    }


def level_report(concurrency: int, results: Sequence[RequestResult], duration_s: float,
                 before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    counted = [r.output_tokens for r in done if r.output_tokens is not None]
    output_tokens = sum(counted) if counted else None
    chunks = sum(len(r.chunk_times) for r in done)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(done),
        "errors": len(failed),
        "duration_s": duration_s,
        "requests_per_s": len(done) / duration_s if duration_s > 0 else None,
        "input_tokens": sum(r.prompt_tokens or 0 for r in done),
        "cached_input_tokens": sum(r.cached_tokens or 0 for r in done),
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / duration_s if output_tokens is not None and duration_s > 0 else None,
        "ttft_s": summarize([r.ttft_s for r in done if r.ttft_s is not None]),
        "itl_s": summarize([gap for r in done for gap in r.itl_s]),
        "tpot_s": summarize([r.tpot_s for r in done if r.tpot_s is not None]),
        "e2e_s": summarize([r.e2e_s for r in done]),
        "tokens_per_chunk": output_tokens / chunks if output_tokens is not None and chunks else None,
        **spec_stats(before, after),
        "error_messages": [r.error for r in failed[:MAX_ERROR_MESSAGES]],
    }


# ---- the sweep ----------------------------------------------------------------------------
async def scrape(http: Any, url: str, model: str, warned: list[str]) -> dict[str, float] | None:
    import httpx

    try:
        response = await http.get(url)
        response.raise_for_status()
        return counter_totals(response.text, model)
    except (httpx.HTTPError, ValueError) as exc:
        if not warned:
            warned.append(url)
            print(f"esp-bench serve: no metrics from {url} ({type(exc).__name__}: {exc}); tau is not reported",
                  file=sys.stderr)
        return None


async def run_level(client: Any, model: str, prompts: Sequence[Prompt], concurrency: int,
                    settings: ServeSettings, on_done: Any = None) -> tuple[list[RequestResult], float]:
    """Every prompt once, `concurrency` requests in flight; returns results in prompt order and the wall time."""
    results: list[RequestResult | None] = [None] * len(prompts)
    todo = iter(enumerate(prompts))  # shared by the workers: each takes the next prompt when free

    async def worker() -> None:
        for i, prompt in todo:
            results[i] = await send_request(client, model, prompt, settings)
            if on_done is not None:
                on_done(results[i])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
    return [r for r in results if r is not None], time.perf_counter() - start


async def run_benchmark(settings: ServeSettings, prompts: Sequence[Prompt], levels: list[dict[str, Any]],
                        progress: bool = True) -> str:
    """Warm up, then one level per concurrency, appending each level's report to `levels` as it ends
    (so an interrupted sweep keeps the finished ones). Returns the model name used."""
    import httpx
    import openai
    from tqdm import tqdm

    api_key = settings.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("ESP_SERVE_API_KEY") or "EMPTY"
    client = openai.AsyncOpenAI(base_url=settings.base_url, api_key=api_key, max_retries=0,
                                timeout=settings.timeout_s)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with client, httpx.AsyncClient(timeout=60, headers=headers) as http:
        model = settings.model or await first_model(client)
        total = settings.warmup + len(settings.concurrency) * len(prompts)
        warned: list[str] = []
        with tqdm(total=total, desc="esp-bench serve", unit="req", file=sys.stderr, disable=not progress,
                  dynamic_ncols=True) as bar:
            bar.set_postfix_str("warmup")
            for i in range(settings.warmup):
                warm = await send_request(client, model, prompts[i % len(prompts)], settings)
                if not warm.ok:
                    raise BenchError(f"warmup request failed: {warm.error}")
                bar.update()
            for concurrency in settings.concurrency:
                bar.set_postfix_str(f"concurrency {concurrency}")
                before = await scrape(http, settings.resolved_metrics_url(), model, warned)
                results, duration = await run_level(client, model, prompts, concurrency, settings,
                                                    on_done=lambda _: bar.update())
                after = await scrape(http, settings.resolved_metrics_url(), model, warned)
                levels.append(level_report(concurrency, results, duration, before, after))
    return model


async def first_model(client: Any) -> str:
    page = await client.models.list()
    if not page.data:
        raise BenchError("the server lists no models; pass --model")
    return page.data[0].id


# ---- the report ---------------------------------------------------------------------------
def _ms(stats: dict[str, float | None], key: str) -> str:
    value = stats[key]
    return fmt(value * 1000 if value is not None else None, ".1f")


def format_table(levels: Sequence[dict[str, Any]]) -> str:
    head = ["concurrency", "requests", "errors", "duration s", "req/s", "out tok/s", "ttft p50 ms", "ttft p99 ms",
            "itl p50 ms", "itl p99 ms", "tpot p50 ms", "e2e p50 s", "e2e p99 s", "tau"]
    body = []
    for lv in levels:
        body.append([str(lv["concurrency"]), str(lv["requests"]), str(lv["errors"]), fmt(lv["duration_s"], ".2f"),
                     fmt(lv["requests_per_s"], ".2f"), fmt(lv["output_tokens_per_s"], ".1f"),
                     _ms(lv["ttft_s"], "p50"), _ms(lv["ttft_s"], "p99"), _ms(lv["itl_s"], "p50"),
                     _ms(lv["itl_s"], "p99"), _ms(lv["tpot_s"], "p50"), fmt(lv["e2e_s"]["p50"], ".2f"),
                     fmt(lv["e2e_s"]["p99"], ".2f"), fmt(lv["tau"], ".2f")])
    return grid(head, body)


# ---- the command --------------------------------------------------------------------------
DESCRIPTION = ("Benchmark a running OpenAI-compatible server: streaming chat completions over Spec-Bench prompts "
               "at one or more concurrency levels.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help="the server's OpenAI API base")
    p.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY, else $ESP_SERVE_API_KEY, else 'EMPTY'")
    p.add_argument("--model", default=None, help="served model name (default: the first of /v1/models)")
    p.add_argument("--prompts", required=True, help="Spec-Bench question.jsonl")
    p.add_argument("--per-category", type=int, default=0, help="first N prompts of each category (0 = all)")
    p.add_argument("--num-prompts", type=int, default=0, help="at most N prompts in all (0 = no cap)")
    p.add_argument("--max-tokens", type=int, default=128, help="max_completion_tokens of every request")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--concurrency", default=DEFAULT_CONCURRENCY,
                   help="requests in flight; a comma list sweeps, each level over the same prompts")
    p.add_argument("--spec-method", default=None, help="extra body spec_method (esp, pld, lade, hybrid, ar)")
    p.add_argument("--spec-preset", default=None, help="extra body spec_preset (bc10, bc30, bc60, ...)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="extra body ignore_eos: every request runs to --max-tokens")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests before the sweep")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--metrics-url", default=None, help="Prometheus endpoint (default: the server root + /metrics)")
    p.add_argument("--json", dest="json_path", default=None, help="write the full results here")
    plots.add_plot_argument(p)
    p.add_argument("--system-prompt", default=None,
                   help="a system message sent before every prompt; @FILE reads it from a file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    if args.max_tokens < 1:
        raise BenchError("--max-tokens must be at least 1")
    if args.per_category < 0 or args.num_prompts < 0 or args.warmup < 0:
        raise BenchError("--per-category, --num-prompts and --warmup must be >= 0")
    if args.timeout <= 0:
        raise BenchError("--timeout must be positive")
    system = args.system_prompt
    if system is not None and system.startswith("@"):
        try:
            system = Path(system[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise BenchError(f"--system-prompt: cannot read {system[1:]}: {exc.strerror}") from exc
    return ServeSettings(
        prompts=args.prompts, base_url=args.base_url, api_key=args.api_key, model=args.model,
        per_category=args.per_category, num_prompts=args.num_prompts, max_tokens=args.max_tokens,
        temperature=args.temperature, concurrency=parse_concurrency(args.concurrency),
        spec_method=args.spec_method, spec_preset=args.spec_preset, ignore_eos=args.ignore_eos,
        warmup=args.warmup, timeout_s=args.timeout, metrics_url=args.metrics_url, system_prompt=system,
    )


def run(args: argparse.Namespace, command: str) -> int:
    """Run the sweep `args` describe; `command` is recorded in the report. Raises BenchError for a
    usage error; a failure talking to the server is reported here and returns 1."""
    settings = settings_from_args(args)
    if args.plot:
        plots.require_matplotlib()
    prompts = load_prompts(settings.prompts, settings.per_category or None, settings.num_prompts or None)
    try:
        import openai
    except ImportError:
        raise BenchError("needs the openai package: pip install 'esp-serve[bench]'") from None

    levels: list[dict[str, Any]] = []
    model, interrupted = settings.model, False
    try:
        model = asyncio.run(run_benchmark(settings, prompts, levels, progress=not args.no_progress))
    except KeyboardInterrupt:
        interrupted = True
        print(f"esp-bench serve: interrupted; reporting the {len(levels)} finished levels", file=sys.stderr)
    except (BenchError, openai.OpenAIError) as exc:
        print(f"esp-bench serve: error: {exc}", file=sys.stderr)
        return 1
    report = {
        "base_url": settings.base_url,
        "model": model,
        "settings": settings.to_dict(len(prompts)),
        "levels": levels,
        "command": command,
        "date": utc_now(),
    }
    print(f"{settings.base_url} model {model}, {len(prompts)} prompts per level, max_tokens {settings.max_tokens}, "
          f"temperature {settings.temperature}"
          + "".join(f", {k} {v}" for k, v in settings.extra_body().items())
          + (" (interrupted)" if interrupted else ""))
    print(format_table(levels))
    if args.json_path:
        print(f"results written to {write_json(args.json_path, report)}")
    if args.plot and levels:
        print(f"plot written to {plots.plot_serve([report], args.plot)}")
    return 130 if interrupted else 0
