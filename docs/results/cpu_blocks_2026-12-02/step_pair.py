# Paired full-pass timing: median ratio of an n-row pass to a 1-row pass, in one process.
import sys, time, random, statistics, torch
sys.path.insert(0, "/work/main")
from esp_engine.loader import load_model
from esp_engine.kv_cache import KVCache
loaded = load_model(sys.argv[1], dtype="bfloat16", quantization=sys.argv[2], num_threads=2)
model = loaded.model; shape = model.shape; ctx = 256
ROWS = [int(r) for r in sys.argv[3].split(",")]
cache = KVCache.standalone(shape.num_layers, shape.num_kv_heads, shape.head_dim, ctx + max(ROWS), model.dtype, model.device)
ids = torch.randint(0, shape.vocab_size, (ctx + max(ROWS),))
model(cache, model.embed(ids[:ctx]), torch.arange(ctx), None)
def run(n, logits_rows):
    mask = torch.ones(n, n, dtype=torch.bool).tril_() if n > 1 else None
    t = time.perf_counter()
    h = model(cache, model.embed(ids[ctx:ctx + n]), torch.arange(ctx, ctx + n), mask)
    t1 = time.perf_counter()
    model.logits(h[:logits_rows])
    t2 = time.perf_counter(); cache.truncate(ctx)
    return t1 - t, t2 - t1
res = {n: [] for n in ROWS}
for _ in range(3):
    for n in ROWS: run(n, n)
for rep in range(int(sys.argv[4]) if len(sys.argv) > 4 else 15):
    order = ROWS[:]; random.shuffle(order)
    for n in order: res[n].append(run(n, n))
base = res[ROWS[0]]
for n in ROWS:
    body = statistics.median(a[0] for a in res[n]); head = statistics.median(a[1] for a in res[n])
    ratio = statistics.median((a[0] + a[1]) / (b[0] + b[1]) for a, b in zip(res[n], base))
    print(f"{n:3d} rows: layers {body*1e3:6.1f} ms  head {head*1e3:5.1f} ms  total/1row {ratio:.2f}", flush=True)
