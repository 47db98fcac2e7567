import sys, time, json, collections
sys.path.insert(0, "/work/main")
from esp_engine.loader import load_model
from esp_engine.engine import LLMEngine
from esp_engine.config import SamplingParams, SpecConfig
from esp_engine import model_runner as mr
from tests.conftest import chat_ids
loaded = load_model(sys.argv[1], dtype="bfloat16", quantization="w8a8", num_threads=2)
eng = LLMEngine(loaded)
qs = [json.loads(l) for l in open("/work/shared/data/spec_bench/question.jsonl")]
prompts = [chat_ids(loaded.tokenizer, q["turns"][0]) for q in qs[::37]][:10]
T = collections.defaultdict(float); rows_seen = collections.Counter()
def timed(name, f):
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); T[name] += time.perf_counter() - t; return r
    return g
m = eng.model
m.forward_batch = timed("forward", m.forward_batch)
m.logits = timed("head", m.logits)
R = eng.runner
for name in ("_decode_piece", "_finish", "_greedy_choices", "_choose"):
    setattr(R, name, timed(name, getattr(R, name)))
mr.compact_caches = timed("compact", mr.compact_caches)
eng.step = timed("step", eng.step)
sched = eng.scheduler
sched.schedule = timed("schedule", sched.schedule); sched.update = timed("update", sched.update)
for meth in ("ar", "esp:bc10", "ar", "esp:bc10"):
    spec = SpecConfig(method="ar") if meth == "ar" else SpecConfig.from_preset(*meth.split(":"))
    eng.generate(prompts[0], SamplingParams(max_new_tokens=4), spec)
    T.clear(); calls = 0
    for p in prompts:
        r = eng.generate(p, SamplingParams(max_new_tokens=64), spec); calls += r.num_decode_calls + 1
    print(meth, calls, "steps; ms per step:", "  ".join(f"{k} {v / calls * 1e3:.2f}" for k, v in sorted(T.items(), key=lambda kv: -kv[1])))
