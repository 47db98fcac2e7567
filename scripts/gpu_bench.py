"""The CUDA engine's numbers in one command: roofline, step cost by rows, plain decoding against the
roofline, ESP and hybrid at their presets, their projected speedup, and graph capture.

    python scripts/gpu_bench.py --out out/gpu_bench                 # one H100/H200, under 5 minutes
    python scripts/gpu_bench.py --tiny --device cpu --out /tmp/gb   # seconds: the CI check of the script

Nothing is downloaded: the model is built on the device with Llama-3.1-8B's config and random
weights in bf16 (weights do not change timing), and the KV pool holds random keys and values.
Every pass is the engine's padded decode pass (esp_engine/padded_runner.py): on CUDA a replayed
CUDA graph per bucket, elsewhere the same pass eagerly. A step's cost here is what the engine pays
for the pass and its LM head: laying the step out, copying it over, the replay, the LM head over
the rows that choose tokens (and, for ESP, over the masks read back), timed to the device's end.

Measured, in order (each stage is skipped once --budget-s is spent; the JSON says which):
1. the device's copy bandwidth (read + write of a large buffer): the roofline of a decode step
   is (weights read + the batch's KV read) / bandwidth;
2. graph capture of the engine's bucket ladder (batch 1..64 x rows 1, 16, 32, 64): seconds and memory;
3. step latency for rows 1..128 per sequence at batch 1, 8, 32 (a chain: every row's logits);
4. ar tokens/s at batch 1, 8, 32 against the roofline;
5. esp and hybrid steps at presets bc10, bc30, bc60 (bc30 is the default), and the projected
   speedup tau x cost(1 row) / cost(block) with tau measured on CPU (--tau, docs/benchmarks.md);
6. attention backends side by side (batched SDPA over gathered keys, FlexAttention over the
   pool) at rows 1 and 32, and the eager unpadded pass for comparison.
It writes gpu_bench.json and gpu_bench.md into --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from esp_engine.config import SpecConfig  # noqa: E402
from esp_engine.kv_cache import KVPool  # noqa: E402
from esp_engine.model import LlamaFamilyModel  # noqa: E402
from esp_engine.padded_attention import BACKENDS  # noqa: E402
from esp_engine.padded_runner import PaddedForward  # noqa: E402
from esp_engine.step_buckets import DEFAULT_BATCH_SIZES, DEFAULT_ROWS, BlockRows, BucketLadder  # noqa: E402
from esp_engine.tree import block_layout  # noqa: E402

LLAMA_31_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
# tau (tokens per decode pass) measured on CPU, fp32, SmolLM2-135M, greedy (docs/benchmarks.md): bc30 over all
# 480 Spec-Bench prompts, bc10 and bc60 over the 26-prompt table; hybrid bc60 was not measured.
DEFAULT_TAUS = "esp:bc10=1.127,esp:bc30=1.21,esp:bc60=1.229,hybrid:bc10=1.42,hybrid:bc30=1.68"
ROWS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
BATCHES = (1, 8, 32)
METHODS = ("esp", "hybrid")
PRESETS = ("bc10", "bc30", "bc60")
DEFAULT_PRESET = "bc30"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/gpu_bench", help="folder for gpu_bench.json and gpu_bench.md")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of width 64 (seconds, any device)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--context", type=int, default=None, help="cached tokens per sequence (default 512; tiny 64)")
    parser.add_argument("--attention", default="auto", choices=["auto", *BACKENDS],
                        help="backend of the main measurements (auto: gathered on CUDA, sequence elsewhere)")
    parser.add_argument("--no-graphs", action="store_true", help="eager passes on CUDA too")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--tau", default=DEFAULT_TAUS, help="method:preset=tau,... for the projected speedup")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per point (default 20; tiny 3)")
    parser.add_argument("--budget-s", type=float, default=270.0, help="stop measuring new stages after this long")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    context = args.context or (64 if args.tiny else 512)
    repeats = args.repeats or (3 if args.tiny else 20)
    rows_list = [int(r) for r in args.rows.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    taus = _parse_taus(args.tau)
    bench = Bench(device, dtype, TINY if args.tiny else LLAMA_31_8B, context, repeats, args, started)
    report = bench.run(rows_list, batches, taus)
    report["seconds_total"] = round(time.perf_counter() - started, 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_bench.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'gpu_bench.json'} and {out / 'gpu_bench.md'}")
    return 0


def _parse_taus(text: str) -> dict[str, float]:
    taus = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        taus[name.strip()] = float(value)
    return taus


def build_model(config: dict, device: torch.device, dtype: torch.dtype) -> LlamaFamilyModel:
    """The engine's model over a Hugging Face Llama built directly on `device`, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(LlamaConfig(**config)).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        gen = torch.Generator(device=device).manual_seed(0)
        for p in hf.parameters():  # finite, small, whatever the init did
            p.normal_(0.0, 0.02, generator=gen) if p.dim() > 1 else p.fill_(1.0)
    model = LlamaFamilyModel(hf)
    model.requires_grad_(False)
    del hf
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    def __init__(self, device, dtype, config, context, repeats, args, started) -> None:
        self.device, self.dtype, self.config, self.context, self.repeats = device, dtype, config, context, repeats
        self.args, self.started = args, started
        self.skipped: list[str] = []
        self.errors: dict[str, str] = {}

    def within_budget(self, stage: str) -> bool:
        if time.perf_counter() - self.started > self.args.budget_s:
            self.skipped.append(stage)
            return False
        return True

    def time_step(self, step, warmup: int = 2) -> dict:
        for _ in range(warmup):
            step()
        _sync(self.device)
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            step()
            _sync(self.device)
            times.append(time.perf_counter() - t0)
        return {"ms": round(statistics.median(times) * 1000, 4), "min_ms": round(min(times) * 1000, 4)}

    # ---- the run -------------------------------------------------------------------------------
    def run(self, rows_list, batches, taus) -> dict:
        t0 = time.perf_counter()
        model = build_model(self.config, self.device, self.dtype)
        _sync(self.device)
        build_s = time.perf_counter() - t0
        shape = model.shape
        self.model = model
        report: dict = {"device": self.device_info(), "model": {
            "config": "tiny" if self.args.tiny else "Llama-3.1-8B", "dtype": str(self.dtype)[6:],
            "layers": shape.num_layers, "hidden": shape.hidden_size, "heads": shape.num_heads,
            "kv_heads": shape.num_kv_heads, "vocab": shape.vocab_size, "build_s": round(build_s, 2),
            "parameters": sum(p.numel() for p in model.parameters())}, "context": self.context}
        params_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        embed_bytes = model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
        kv_per_token = KVPool.slot_bytes(shape.num_layers, shape.num_kv_heads, shape.head_dim, self.dtype)
        bandwidth = self.copy_bandwidth()
        weights_read = params_bytes - embed_bytes  # a decode step reads every weight but the embedding table
        report["roofline"] = {"copy_GBps": round(bandwidth / 1e9, 1), "weight_bytes": params_bytes,
                              "weight_bytes_read_per_step": weights_read, "kv_bytes_per_token": kv_per_token}

        max_batch, max_rows = max(batches), max(max(rows_list), DEFAULT_ROWS[-1])  # capture needs no caches
        slots_per_seq = self.context + max_rows + 32
        num_blocks = max_batch * math.ceil(slots_per_seq / 16) + 4 * 2  # + scratch blocks of each forward
        pool = KVPool(shape.num_layers, shape.num_kv_heads, shape.head_dim, num_blocks, 16, self.dtype, self.device)
        pool.keys.normal_()
        pool.values.normal_()
        self.pool = pool
        self.caches = [pool.allocate(slots_per_seq) for _ in range(max_batch)]
        for cache in self.caches:
            cache.length = self.context
        gen = torch.Generator(device="cpu").manual_seed(1)
        ids = torch.randint(0, shape.vocab_size, (max_rows,), generator=gen).to(self.device)
        self.embeds = model.embed(ids)  # [max_rows, hidden]: every sequence's rows read the same embeddings
        batch_sizes = tuple(sorted(set(DEFAULT_BATCH_SIZES) | set(batches)))
        rows_ladder = tuple(sorted(set(DEFAULT_ROWS) | set(rows_list)))
        self.ladder = BucketLadder(batch_sizes, rows_ladder)
        graphs = self.device.type == "cuda" and not self.args.no_graphs
        self.forward = PaddedForward(model, pool, self.ladder, self.args.attention, graphs=graphs)
        report["attention"] = self.forward.attention
        report["graphs"] = graphs

        report["capture"] = self.capture()
        report["step_latency"] = self.rows_curve(rows_list, batches)
        report["ar"] = self.ar(batches, bandwidth, weights_read, kv_per_token, report["step_latency"])
        report["presets"] = self.presets(batches, taus, report["step_latency"])
        report["attention_backends"] = self.backends(batches)
        if report["capture"]:  # every graph of the run, the measurement buckets captured on first use too
            report["capture"].update(graphs_in_run=self.forward.num_graphs,
                                     seconds_in_run=round(self.forward.capture_seconds, 2))
        report["targets"] = targets(report)
        report["skipped"] = self.skipped
        report["errors"] = self.errors
        return report

    def device_info(self) -> dict:
        info = {"type": self.device.type, "torch": torch.__version__, "python": platform.python_version()}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            info.update(name=props.name, memory_GiB=round(props.total_memory / 2**30, 1),
                        capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                        driver_visible_devices=torch.cuda.device_count())
        else:
            info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
        return info

    def copy_bandwidth(self) -> float:
        """Bytes per second moved by a device-to-device copy (each byte read once and written once)."""
        size = 2 * 2**30 if self.device.type == "cuda" else 64 * 2**20
        src = torch.empty(size, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        _sync(self.device)
        best = math.inf
        for _ in range(10 if self.device.type == "cuda" else 3):
            t0 = time.perf_counter()
            dst.copy_(src)
            _sync(self.device)
            best = min(best, time.perf_counter() - t0)
        del src, dst
        return 2 * size / best

    # ---- steps ---------------------------------------------------------------------------------
    def step(self, batch: int, rows: int, attn: torch.Tensor | None, offsets: torch.Tensor | None,
             choosing: int, readout: int = 0, forward: PaddedForward | None = None):
        """One engine decode step: `batch` sequences, each a block of `rows` rows under `attn`
        (None: a chain), LM head over each one's first `choosing` rows, then over `readout` more."""
        forward = forward or self.forward
        offsets = torch.arange(rows) if offsets is None else offsets
        blocks = [BlockRows(cache, self.embeds[:rows], offsets + self.context, attn) for cache in self.caches[:batch]]
        choose = torch.tensor([b * rows + i for b in range(batch) for i in range(choosing)], device=self.device)
        reads = torch.tensor([b * rows + rows - readout + i for b in range(batch) for i in range(readout)],
                             device=self.device)
        model, caches, context = self.model, self.caches[:batch], self.context

        def run() -> None:
            hidden = forward.run(blocks)
            for cache in caches:
                cache.length = context
            model.logits(hidden.index_select(0, choose))
            if readout:
                model.logits(hidden.index_select(0, reads))

        return run, blocks

    def measure(self, name: str, batch: int, rows: int, attn=None, offsets=None, choosing=None, readout=0,
                forward: PaddedForward | None = None) -> dict:
        forward = forward or self.forward
        point = {"batch": batch, "rows": rows}
        try:
            run, blocks = self.step(batch, rows, attn, offsets, rows if choosing is None else choosing, readout, forward)
            key = forward.key(blocks)
            point["bucket"] = f"{key[0].batch}x{key[0].rows}" if key else None
            point.update(self.time_step(run))
            if forward.use_graphs and key is not None:  # the replay alone: device time of the pass
                point["graph_ms"] = self.time_step(lambda: forward.replay(key))["ms"]
        except Exception as exc:  # a backend that fails on this device is a result, not a crash
            self.errors[f"{name} b{batch} r{rows}"] = f"{type(exc).__name__}: {exc}"[:500]
            point["error"] = self.errors[f"{name} b{batch} r{rows}"]
        return point

    def capture(self) -> dict:
        if not self.within_budget("capture"):
            return {}
        ladder = BucketLadder()
        if not self.forward.use_graphs:
            return {"buckets": len(ladder.buckets()), "graphs": 0, "seconds": 0.0, "memory_bytes": 0,
                    "note": "eager: no graphs on this device"}
        try:
            stats = self.forward.capture(ladder.buckets(), self.context)
        except Exception as exc:
            self.errors["capture"] = f"{type(exc).__name__}: {exc}"[:500]
            return {"error": self.errors["capture"]}
        return {"buckets": len(ladder.buckets()), "graphs": stats.num_graphs, "seconds": round(stats.seconds, 2),
                "memory_bytes": stats.memory_bytes, "memory_GiB": round(stats.memory_bytes / 2**30, 3)}

    def rows_curve(self, rows_list, batches) -> list[dict]:
        points = []
        for batch in batches:
            for rows in rows_list:
                if not self.within_budget(f"step_latency b{batch} r{rows}"):
                    continue
                points.append(self.measure("rows", batch, rows))
        for p in points:
            one = next((q for q in points if q["batch"] == p["batch"] and q["rows"] == 1 and "ms" in q), None)
            if one and "ms" in p:
                p["vs_one_row"] = round(p["ms"] / one["ms"], 3)
        return points

    def ar(self, batches, bandwidth, weights_read, kv_per_token, curve) -> list[dict]:
        points = []
        for batch in batches:
            step = next((q for q in curve if q["batch"] == batch and q["rows"] == 1 and "ms" in q), None)
            roof_s = (weights_read + batch * (self.context + 1) * kv_per_token) / bandwidth
            point = {"batch": batch, "roofline_tokens_per_s": round(batch / roof_s, 1)}
            if step:
                point["step_ms"] = step["ms"]
                point["tokens_per_s"] = round(batch / (step["ms"] / 1000), 1)
                point["fraction_of_roofline"] = round(point["tokens_per_s"] / point["roofline_tokens_per_s"], 4)
            points.append(point)
        return points

    def presets(self, batches, taus, curve) -> list[dict]:
        points = []
        for method in METHODS:
            for preset in PRESETS:
                spec = SpecConfig.from_preset(method, preset)
                parents = representative_tree(spec)
                layout = block_layout(parents, spec.num_masks)
                tree_rows = layout.num_tree_rows
                for batch in batches:
                    if not self.within_budget(f"{method}:{preset} b{batch}"):
                        continue
                    point = self.measure(f"{method}:{preset}", batch, layout.num_rows, layout.attn, layout.offsets,
                                         choosing=tree_rows, readout=spec.num_masks)
                    point.update(method=method, preset=preset, default=preset == DEFAULT_PRESET,
                                 tree_rows=tree_rows, num_masks=spec.num_masks)
                    ar = next((q for q in curve if q["batch"] == batch and q["rows"] == 1 and "ms" in q), None)
                    tau = taus.get(f"{method}:{preset}")
                    point["tau"] = tau
                    if ar and "ms" in point:
                        point["cost_vs_ar"] = round(point["ms"] / ar["ms"], 3)
                        point["projected_speedup"] = round(tau * ar["ms"] / point["ms"], 3) if tau else None
                    points.append(point)
        return points

    def backends(self, batches) -> list[dict]:
        """Each attention backend at rows 1 and 32, and the eager unpadded pass for plain decoding."""
        points = []
        names = [b for b in BACKENDS if b != "sequence" or self.device.type != "cuda"]
        for name in names:
            if not self.within_budget(f"backend {name}"):
                continue
            try:
                graphs = self.forward.use_graphs and name != "sequence"
                forward = self.forward if name == self.forward.attention else PaddedForward(
                    self.model, self.pool, self.ladder, name, graphs=graphs)
            except Exception as exc:
                self.errors[f"backend {name}"] = f"{type(exc).__name__}: {exc}"[:500]
                continue
            t0 = time.perf_counter()
            for batch in batches:
                for rows in (1, 32):
                    if not self.within_budget(f"backend {name} b{batch} r{rows}"):
                        continue
                    point = self.measure(f"backend {name}", batch, rows, forward=forward)
                    point.update(attention=name, graphs=forward.use_graphs)
                    points.append(point)
            if points:
                points[-1]["backend_seconds"] = round(time.perf_counter() - t0, 2)  # compiles and captures included
        if self.within_budget("eager unpadded"):
            for batch in batches:
                points.append(self.eager_unpadded(batch))
        return points

    def eager_unpadded(self, batch: int) -> dict:
        """The current engine's pass (`forward_batch`, eager, no padding) for one row per sequence."""
        caches, context, model = self.caches[:batch], self.context, self.model
        embeds = self.embeds[:1].expand(batch, -1).contiguous()
        positions = torch.full((batch,), context, device=self.device)

        def run() -> None:
            hidden = model.forward_batch(caches, embeds, positions, [None] * batch, [1] * batch)
            for cache in caches:
                cache.length = context
            model.logits(hidden)

        point = {"batch": batch, "rows": 1, "attention": "unpadded eager (forward_batch)", "graphs": False}
        point.update(self.time_step(run))
        return point


def representative_tree(spec: SpecConfig) -> tuple[int, ...]:
    """Parents of a tree of the preset's size: ESP's static widths by top-1 expansion, or, for a
    dynamic tree (hybrid), a copied chain beside ESP's root children. The shape is data to a
    padded pass; only its row count (its bucket) and its choosing rows change the cost."""
    parents: list[int] = []
    if spec.method == "esp" and spec.tree is not None:
        parent = 0
        for width in spec.tree:
            first = len(parents) + 1
            parents.extend([parent] * width)
            parent = first
        return tuple(parents)
    budget = spec.esp_node_budget
    chain = min(spec.pld_num_drafts, max(0, budget - spec.hybrid_min_esp_nodes)) if spec.method == "hybrid" else 0
    parents.extend(range(chain))  # node i+1's parent is row i: a chain from the root
    parents.extend([0] * (budget - chain))
    return tuple(parents)


def targets(report: dict) -> dict:
    """The issue's targets, as measured here (None where a number is missing)."""
    def find(points, **match):
        return next((p for p in points if all(p.get(k) == v for k, v in match.items())), None)

    curve, presets = report.get("step_latency", []), report.get("presets", [])
    ar1 = find(report.get("ar", []), batch=1) or {}
    r32, r64 = find(curve, batch=1, rows=32) or {}, find(curve, batch=1, rows=64) or {}
    out = {
        "ar_batch1_fraction_of_roofline": ar1.get("fraction_of_roofline"),
        "ar_batch1_at_least_0.8_of_roofline": _at_least(ar1.get("fraction_of_roofline"), 0.8),
        "rows32_vs_one_row_batch1": r32.get("vs_one_row"),
        "rows32_at_most_1.15x": _at_most(r32.get("vs_one_row"), 1.15),
        "rows64_vs_one_row_batch1": r64.get("vs_one_row"),
        "rows64_at_most_1.3x": _at_most(r64.get("vs_one_row"), 1.3),
        "capture_seconds": report.get("capture", {}).get("seconds"),
        "capture_under_60s": _at_most(report.get("capture", {}).get("seconds"), 60.0),
    }
    for method in METHODS:
        b1 = find(presets, method=method, preset=DEFAULT_PRESET, batch=1) or {}
        b32 = find(presets, method=method, preset=DEFAULT_PRESET, batch=32) or {}
        out[f"{method}_{DEFAULT_PRESET}_batch1_projected"] = b1.get("projected_speedup")
        out[f"{method}_{DEFAULT_PRESET}_batch1_at_least_1.4x"] = _at_least(b1.get("projected_speedup"), 1.4)
        out[f"{method}_{DEFAULT_PRESET}_batch32_projected"] = b32.get("projected_speedup")
        out[f"{method}_{DEFAULT_PRESET}_batch32_not_below_ar"] = _at_least(b32.get("projected_speedup"), 1.0)
    return out


def _at_least(value, bound):
    return None if value is None else value >= bound


def _at_most(value, bound):
    return None if value is None else value <= bound


def markdown(report: dict) -> str:
    dev, model, roof = report["device"], report["model"], report["roofline"]
    lines = [f"# gpu_bench: {model['config']} ({model['dtype']}) on {dev.get('name')} ({dev['type']}), torch {dev['torch']}",
             "",
             f"Context {report['context']} cached tokens per sequence; attention `{report['attention']}`, "
             f"graphs {report['graphs']}; copy bandwidth {roof['copy_GBps']} GB/s; weights read per step "
             f"{roof['weight_bytes_read_per_step'] / 1e9:.2f} GB; total {report.get('seconds_total', '?')} s.", ""]
    cap = report.get("capture", {})
    if cap:
        lines += [f"Graph capture: {cap.get('graphs', 0)} graphs in {cap.get('seconds', 0)} s, "
                  f"{cap.get('memory_GiB', 0)} GiB{' (' + cap['note'] + ')' if 'note' in cap else ''}"
                  f"{' ERROR ' + cap['error'] if 'error' in cap else ''}.", ""]
    curve = report.get("step_latency", [])

    def cell(batch: int, rows: int) -> str:
        p = next((q for q in curve if q["batch"] == batch and q["rows"] == rows), None)
        return "-" if not p or "ms" not in p else f"{p['ms']:.3f} ({p.get('vs_one_row', 0):.2f}x)"

    batches = sorted({p["batch"] for p in curve})
    lines += _section("Step latency by rows per sequence (ms, and vs 1 row)", ["rows", *(f"batch {b}" for b in batches)],
                      [[r, *(cell(b, r) for b in batches)] for r in sorted({p["rows"] for p in curve})])
    lines += _section("Plain decoding against the roofline",
                      ["batch", "step ms", "tokens/s", "roofline tokens/s", "fraction"],
                      [[p["batch"], p.get("step_ms", "-"), p.get("tokens_per_s", "-"), p["roofline_tokens_per_s"],
                        p.get("fraction_of_roofline", "-")] for p in report.get("ar", [])])
    lines += _section("ESP and hybrid at their presets (projected speedup = tau x cost(1 row) / cost(block))",
                      ["method", "preset", "rows (bucket)", "batch", "step ms", "vs ar", "tau", "projected"],
                      [[p["method"], p["preset"] + (" (default)" if p["default"] else ""), f"{p['rows']} ({p.get('bucket')})",
                        p["batch"], p.get("ms", "-"), p.get("cost_vs_ar", "-"), p.get("tau") or "-",
                        p.get("projected_speedup") or "-"] for p in report.get("presets", [])])
    lines += _section("Attention backends", ["attention", "graphs", "batch", "rows", "step ms", "graph ms"],
                      [[p["attention"], p["graphs"], p["batch"], p["rows"], p.get("ms", p.get("error", "-")),
                        p.get("graph_ms", "-")] for p in report.get("attention_backends", [])])
    lines += _section("Targets", ["target", "value"], [[k, v] for k, v in report.get("targets", {}).items()])
    if report.get("skipped"):
        lines += ["", f"Skipped (budget): {', '.join(report['skipped'])}"]
    if report.get("errors"):
        lines += ["", "Errors:", *[f"- {k}: {v}" for k, v in report["errors"].items()]]
    return "\n".join(lines) + "\n"


def _section(title: str, columns: list[str], rows: list[list]) -> list[str]:
    """A markdown table under a heading; nothing when there are no rows."""
    if not rows:
        return []
    return [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


if __name__ == "__main__":
    raise SystemExit(main())
