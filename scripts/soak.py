"""Soak a running esp-serve with mixed traffic, then check that it is back where it started.

    esp-serve &                                   # or any server on 127.0.0.1
    python scripts/soak.py --minutes 10 --base-url http://127.0.0.1:8000 --json soak.json

For N minutes, `--concurrency` workers send a weighted mix of chat and text completions, streamed
and not, streams cut after a few chunks (a client that goes away), and bad inputs (broken JSON,
wrong types, NaN, huge seeds, over-long prompts, unknown models and paths, wrong methods); every
`--burst-every` seconds a burst of `--burst` short requests arrives at once, past any admission
limit. Meanwhile the server's resident memory (VmRSS of `--pid`, or of the process listening on
the port) is sampled. When the time is up the workers stop, the script waits for the server to go
idle and reads /metrics: running and waiting requests and KV-cache usage must be back to 0, or
blocks leaked. It prints a table and writes the full report as JSON; the exit status is 1 on any
5xx, dropped connection, broken stream or leak.

Only loopback servers are accepted: this is a load generator. Needs httpx (installed with the
project's `bench` or `test` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "esp:kv_cache_bytes")

PROMPTS = [
    "Write a haiku about the sea.",
    "Name three prime numbers and explain why they are prime.",
    "Summarize the plot of a detective story in two sentences.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "List five uses of a paperclip.",
    "Explain what a hash table is to a ten-year-old.",
]
# A long shared system prompt, so that the prefix cache sees reuse as real chat traffic gives it.
SYSTEM = "You are a concise assistant. Answer in at most three sentences. " * 8

# (weight, kind): the share of each request kind in the mix.
MIX = [(20, "chat"), (20, "chat_stream"), (15, "chat_cancel"), (10, "completion"),
       (10, "completion_stream"), (25, "bad")]


def bad_inputs(model: str) -> list[tuple[str, str, str, bytes | None]]:
    """(name, HTTP method, path, body): requests a server must refuse with a 4xx."""
    msgs = [{"role": "user", "content": "hi"}]

    def body(**fields) -> bytes:
        return json.dumps({"model": model, "messages": msgs, **fields}).encode()

    chat = "/v1/chat/completions"
    return [
        ("invalid_json", "POST", chat, b'{"model": "' + model.encode() + b'", "messages": ['),
        ("missing_messages", "POST", chat, json.dumps({"model": model}).encode()),
        ("empty_messages", "POST", chat, body(messages=[])),
        ("wrong_type", "POST", chat, body(temperature="hot")),
        ("negative_max_tokens", "POST", chat, body(max_tokens=-1)),
        ("nan_temperature", "POST", chat, body()[:-1] + b', "temperature": NaN}'),
        ("huge_seed", "POST", chat, body(seed=2**80, max_tokens=4)),
        ("too_long", "POST", chat, body(messages=[{"role": "user", "content": "word " * 12000}], max_tokens=4)),
        ("unknown_model", "POST", chat, json.dumps({"model": "no-such-model", "messages": msgs}).encode()),
        ("not_found", "POST", "/v1/no-such-endpoint", body()),
        ("wrong_method", "GET", chat, None),
    ]


# ---- aggregation (pure: unit-tested) --------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation, as numpy's default; None when empty."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def latency_summary(values: list[float]) -> dict:
    return {"n": len(values), **{f"p{q}": percentile(values, q) for q in (50, 90, 99)},
            "max": max(values) if values else None}


@dataclass
class Tally:
    """Every finished request: its kind ("bad:<name>" for bad inputs), its outcome (an HTTP status,
    or what went wrong without one) and, for answered requests, latency and time to the first
    streamed chunk. Latency is kept per kind for answers with a 2xx status; all bad inputs share
    the row "bad", and refusals by admission control or a drain (429, 503) the row "rejected"."""

    by_kind: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    ttft: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def record(self, kind: str, outcome: int | str, latency: float | None = None, ttft: float | None = None):
        self.by_kind[kind][str(outcome)] += 1
        if not isinstance(outcome, int) or latency is None:
            return
        if kind.startswith("bad:"):
            self.latency["bad"].append(latency)
        elif outcome in (429, 503):
            self.latency["rejected"].append(latency)
        elif outcome < 300:
            self.latency[kind].append(latency)
        if ttft is not None:
            self.ttft[kind].append(ttft)

    def summary(self) -> dict:
        by_status: Counter = Counter()
        for counts in self.by_kind.values():
            by_status.update(counts)
        total = sum(by_status.values())
        server_errors = sum(n for s, n in by_status.items() if s.isdigit() and int(s) >= 500)
        failures = {s: n for s, n in by_status.items() if not s.isdigit()}
        return {
            "total": total,
            "by_status": dict(sorted(by_status.items())),
            "by_kind": {k: dict(sorted(c.items())) for k, c in sorted(self.by_kind.items())},
            "server_errors": server_errors,
            "failures": dict(sorted(failures.items())),  # dropped connections, broken streams
            "latency_s": {k: latency_summary(v) for k, v in sorted(self.latency.items())},
            "ttft_s": {k: latency_summary(v) for k, v in sorted(self.ttft.items())},
        }


def parse_gauges(text: str) -> dict[str, float]:
    """The gauges of GAUGES from a Prometheus exposition, summed over label sets."""
    from prometheus_client.parser import text_string_to_metric_families

    out = dict.fromkeys(GAUGES, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in out:
                out[sample.name] += sample.value
    return out


# The usage gauge is a difference of fractions (held minus prefix-cached blocks over all blocks),
# so an empty pool can read a rounding residue; one held block is over 1e-9 for any real pool.
USAGE_RESIDUE = 1e-9


def leak_verdict(gauges: dict[str, float]) -> dict:
    """After traffic has stopped: anything still running, waiting or holding KV blocks leaked.
    (Blocks kept by the prefix cache count in neither esp:kv_cache_bytes nor the usage gauge.)"""
    leftovers = {k: v for k, v in gauges.items()
                 if (abs(v) > USAGE_RESIDUE if k == "vllm:kv_cache_usage_perc" else v != 0)}
    return {**gauges, "leaked": bool(leftovers), "leftovers": leftovers}


def rss_summary(samples: list[tuple[float, float]], idle_before: float | None, idle_after: float | None) -> dict:
    values = [mib for _, mib in samples]
    return {"idle_before_mib": idle_before, "idle_after_mib": idle_after,
            "peak_mib": max(values) if values else None, "samples": [[round(t, 1), round(m, 1)] for t, m in samples]}


def verdict(report: dict) -> list[str]:
    """What makes the soak fail: reasons, empty when it passed."""
    req, after = report["requests"], report["after_traffic"]
    problems = []
    if req["server_errors"]:
        problems.append(f"{req['server_errors']} answers with a 5xx status")
    if req["failures"]:
        problems.append(f"requests without a proper answer: {req['failures']}")
    if after["leaked"]:
        problems.append(f"not idle after traffic: {after['leftovers']}")
    return problems


def thin(items: list, n: int) -> list:
    """At most n items, evenly spaced, the first and the last included."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def _fmt(x: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def format_table(report: dict) -> str:
    req, rss, after = report["requests"], report["server"]["rss"], report["after_traffic"]
    lines = [
        f"soak: {report['duration_s']:.0f} s against {report['base_url']}, {req['total']} requests, "
        f"{req['server_errors']} 5xx, failures {req['failures'] or 'none'}",
        "status codes: " + ", ".join(f"{s}: {n}" for s, n in req["by_status"].items()),
        f"RSS MiB: idle before {_fmt(rss['idle_before_mib'], digits=0)}, peak {_fmt(rss['peak_mib'], digits=0)}, "
        f"idle after {_fmt(rss['idle_after_mib'], digits=0)}",
        "RSS over time: " + ", ".join(f"{t:.0f} s {m:.0f}" for t, m in thin(rss["samples"], 11)),
        f"after traffic: running {after['vllm:num_requests_running']:g}, waiting {after['vllm:num_requests_waiting']:g}, "
        f"KV usage {after['vllm:kv_cache_usage_perc']:g} -> {'LEAKED' if after['leaked'] else 'no leak'}",
        "",
        "| kind | answered | p50 ms | p90 ms | p99 ms | max ms | TTFT p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, lat in req["latency_s"].items():
        ttft = req["ttft_s"].get(kind, {}).get("p50")
        lines.append(f"| {kind} | {lat['n']} | {_fmt(lat['p50'], 1e3, 0)} | {_fmt(lat['p90'], 1e3, 0)} | "
                     f"{_fmt(lat['p99'], 1e3, 0)} | {_fmt(lat['max'], 1e3, 0)} | {_fmt(ttft, 1e3, 0)} |")
    return "\n".join(lines)


# ---- the server process ---------------------------------------------------------------------------

def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def listening_pid(port: int) -> int | None:
    """The process with a socket listening on `port` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{cols[9]}]")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                return int(entry.name)
        except OSError:
            continue
    return None


# ---- traffic --------------------------------------------------------------------------------------

@dataclass
class Soak:
    client: object  # httpx.AsyncClient
    model: str
    deadline: float
    rng: random.Random
    tally: Tally = field(default_factory=Tally)

    def _chat_body(self, stream: bool) -> dict:
        sampled = self.rng.random() < 0.3
        body = {"model": self.model, "stream": stream, "max_tokens": self.rng.randint(8, 64),
                "messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": self.rng.choice(PROMPTS)}],
                "temperature": 0.8 if sampled else 0.0}
        if sampled:
            body["seed"] = self.rng.randrange(2**31)
        return body

    def _completion_body(self, stream: bool) -> dict:
        return {"model": self.model, "stream": stream, "max_tokens": self.rng.randint(8, 64), "temperature": 0.0,
                "prompt": SYSTEM + self.rng.choice(PROMPTS)}

    async def plain(self, kind: str, path: str, body: dict) -> None:
        t0 = time.perf_counter()
        try:
            r = await self.client.post(path, json=body)
        except Exception as exc:  # a dropped connection is an outcome to count, not a crash
            self.tally.record(kind, f"transport:{type(exc).__name__}")
            return
        self.tally.record(kind, r.status_code, time.perf_counter() - t0)

    async def stream(self, kind: str, path: str, body: dict, cut_after: int | None = None) -> None:
        t0, ttft, chunks = time.perf_counter(), None, 0
        try:
            async with self.client.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    self.tally.record(kind, r.status_code, time.perf_counter() - t0)
                    return
                done = False
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    if '"error"' in data and json.loads(data).get("error"):
                        self.tally.record(kind, "stream_error_event")
                        return
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    if cut_after is not None and chunks >= cut_after:
                        break  # leaving the block closes the connection: the client went away
                if cut_after is None and not done:
                    self.tally.record(kind, "stream_without_done")
                    return
        except Exception as exc:
            self.tally.record(kind, f"transport:{type(exc).__name__}")
            return
        self.tally.record(kind, 200, time.perf_counter() - t0, ttft)

    async def bad(self) -> None:
        name, method, path, body = self.rng.choice(bad_inputs(self.model))
        kind = f"bad:{name}"
        t0 = time.perf_counter()
        try:
            r = await self.client.request(method, path, content=body,
                                          headers={"Content-Type": "application/json"} if body else None)
        except Exception as exc:
            self.tally.record(kind, f"transport:{type(exc).__name__}")
            return
        self.tally.record(kind, r.status_code, time.perf_counter() - t0)

    async def one(self, kind: str) -> None:
        if kind == "chat":
            await self.plain(kind, "/v1/chat/completions", self._chat_body(False))
        elif kind == "chat_stream":
            await self.stream(kind, "/v1/chat/completions", self._chat_body(True))
        elif kind == "chat_cancel":
            await self.stream(kind, "/v1/chat/completions", self._chat_body(True), cut_after=self.rng.randint(1, 4))
        elif kind == "completion":
            await self.plain(kind, "/v1/completions", self._completion_body(False))
        elif kind == "completion_stream":
            await self.stream(kind, "/v1/completions", self._completion_body(True))
        else:
            await self.bad()

    async def worker(self) -> None:
        weights, kinds = zip(*MIX)
        while time.monotonic() < self.deadline:
            await self.one(self.rng.choices(kinds, weights)[0])

    async def bursts(self, size: int, every: float) -> None:
        while time.monotonic() + every < self.deadline:
            await asyncio.sleep(every)
            body = {"model": self.model, "max_tokens": 8, "temperature": 0.0,
                    "messages": [{"role": "user", "content": self.rng.choice(PROMPTS)}]}
            await asyncio.gather(*(self.plain("burst", "/v1/chat/completions", body) for _ in range(size)))


async def _get(client, path: str):
    try:
        return await client.get(path)
    except Exception:
        return None


async def wait_healthy(client, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = await _get(client, "/health")
        if r is not None and r.status_code == 200:
            return True
        await asyncio.sleep(1)
    return False


async def settle(client, timeout: float) -> tuple[dict[str, float], float]:
    """Poll /metrics until nothing runs, waits or holds KV blocks, for at most `timeout` s."""
    t0 = time.monotonic()
    gauges = dict.fromkeys(GAUGES, math.nan)
    while True:
        r = await _get(client, "/metrics")
        if r is not None and r.status_code == 200:
            gauges = parse_gauges(r.text)
            if not leak_verdict(gauges)["leaked"]:
                break
        if time.monotonic() - t0 > timeout:
            break
        await asyncio.sleep(1)
    return gauges, time.monotonic() - t0


async def run(args) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + args.burst + 4)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.request_timeout)) as client:
        if not await wait_healthy(client, args.wait_seconds):
            raise SystemExit(f"soak.py: {args.base_url}/health did not answer 200 in {args.wait_seconds:g} s")
        models = (await client.get("/v1/models")).json()["data"]
        model = args.model or models[0]["id"]
        pid = args.pid or listening_pid(urlsplit(args.base_url).port or 80)
        idle_before = rss_mib(pid) if pid else None
        started = datetime.now(timezone.utc)
        t0 = time.monotonic()
        soak = Soak(client, model, t0 + args.minutes * 60, random.Random(args.seed))
        samples: list[tuple[float, float]] = []

        async def sample_rss() -> None:
            while pid and time.monotonic() < soak.deadline:
                mib = rss_mib(pid)
                if mib is not None:
                    samples.append((time.monotonic() - t0, mib))
                await asyncio.sleep(args.sample_seconds)

        await asyncio.gather(sample_rss(), soak.bursts(args.burst, args.burst_every),
                             *(soak.worker() for _ in range(args.concurrency)))
        duration = time.monotonic() - t0
        gauges, settled = await settle(client, args.settle_seconds)
        idle_after = rss_mib(pid) if pid else None
        if idle_after is not None:
            samples.append((time.monotonic() - t0, idle_after))
    report = {
        "base_url": args.base_url, "model": model, "started": started.isoformat(timespec="seconds"),
        "duration_s": duration,
        "config": {k: getattr(args, k) for k in ("minutes", "concurrency", "burst", "burst_every", "seed")},
        "server": {"pid": pid, "rss": rss_summary(samples, idle_before, idle_after)},
        "requests": soak.tally.summary(),
        "after_traffic": {**leak_verdict(gauges), "settled_after_s": settled},
    }
    report["problems"] = verdict(report)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, required=True, help="how long to send traffic")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="a loopback server (default %(default)s)")
    p.add_argument("--pid", type=int, default=None, help="server process for RSS (default: the one on the port)")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("ESP_SERVE_API_KEY"))
    p.add_argument("--concurrency", type=int, default=8, help="workers sending requests back to back")
    p.add_argument("--burst", type=int, default=96, help="requests in each burst")
    p.add_argument("--burst-every", type=float, default=60.0, help="seconds between bursts")
    p.add_argument("--sample-seconds", type=float, default=10.0, help="RSS sampling period")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--wait-seconds", type=float, default=600.0, help="how long to wait for /health at the start")
    p.add_argument("--settle-seconds", type=float, default=60.0, help="how long to wait for the server to go idle")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report here (default: stdout)")
    args = p.parse_args(argv)
    if urlsplit(args.base_url).hostname not in LOOPBACK:
        p.error(f"--base-url must be a loopback address ({', '.join(sorted(LOOPBACK))}): this is a load generator")
    if args.minutes <= 0 or args.concurrency < 1 or args.burst < 0:
        p.error("--minutes must be > 0, --concurrency >= 1 and --burst >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    else:
        print(text)
    print(format_table(report), file=sys.stderr)
    for problem in report["problems"]:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
