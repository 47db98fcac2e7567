# Decode-only ms per pass, ar vs a speculative method, prompts alternated; prefill subtracted.
import sys, time, json, statistics
sys.path.insert(0, "/work/main")
from esp_engine.loader import load_model
from esp_engine.engine import LLMEngine
from esp_engine.config import SamplingParams, SpecConfig
from tests.conftest import chat_ids
loaded = load_model(sys.argv[1], dtype="bfloat16", quantization=sys.argv[3] if len(sys.argv) > 3 else "w8a8", num_threads=2)
eng = LLMEngine(loaded)
qs = [json.loads(l) for l in open("/work/shared/data/spec_bench/question.jsonl")]
prompts = [chat_ids(loaded.tokenizer, q["turns"][0]) for q in qs[::37]][:10]
methods = {"ar": SpecConfig(method="ar"), sys.argv[2]: SpecConfig.from_preset(*sys.argv[2].split(":"))}
N = 64
eng.generate(prompts[0], SamplingParams(max_new_tokens=8), methods[sys.argv[2]])
per = {m: [] for m in methods}; tok = {m: 0 for m in methods}; calls = {m: 0 for m in methods}; wall = {m: 0.0 for m in methods}
for p in prompts:
    t = time.perf_counter(); eng.generate(p, SamplingParams(max_new_tokens=1), methods["ar"]); pre = time.perf_counter() - t
    for m, s in methods.items():
        t = time.perf_counter(); r = eng.generate(p, SamplingParams(max_new_tokens=N), s); dt = time.perf_counter() - t - pre
        per[m].append(dt / r.num_decode_calls); tok[m] += r.num_decode_tokens; calls[m] += r.num_decode_calls; wall[m] += dt
for m in methods:
    print(f"{m:10s} median {statistics.median(per[m]) * 1e3:.1f} ms per decode pass, tau {tok[m] / calls[m]:.2f}, decode tok/s {tok[m] / wall[m]:.1f}")
