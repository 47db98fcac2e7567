# In-process A/B of the C++ pass (LlamaFamilyModel.cpu_decoder) against the op-by-op pass: ms per pass
# (forward and logits) at 1, 4 and 10 rows after CONTEXT tokens, 4 alternations, best of each.
# python ab_decoder.py MODEL DTYPE [CONTEXT]
import torch, time, sys
torch.set_num_threads(2)
from esp_engine.loader import load_model
from esp_engine.kv_cache import KVCache
lm = load_model(sys.argv[1], dtype=sys.argv[2]); m = lm.model; s = m.shape
ctx = int(sys.argv[3]) if len(sys.argv) > 3 else 256
c = KVCache.standalone(s.num_layers, s.num_kv_heads, s.head_dim, ctx + 100, m.dtype, "cpu")
ids = torch.randint(0, 1000, (ctx + 64,))
m.forward(c, m.embed(ids[:ctx]), torch.arange(ctx), None)
def step(M):
    mask = None if M == 1 else torch.ones(M, M, dtype=torch.bool).tril()
    e = m.embed(ids[ctx:ctx+M]); h = m.forward(c, e, torch.arange(ctx, ctx + M), mask); m.logits(h[-1:] if M==1 else h); c.length = ctx
res = {}
for rnd in range(4):
    for fused in (True, False):
        m.use_cpu_decoder = fused
        for M in (1, 4, 10):
            for _ in range(3): step(M)
            t = time.perf_counter(); n = 15
            for _ in range(n): step(M)
            res.setdefault((M, fused), []).append((time.perf_counter()-t)/n*1e3)
print(sys.argv[1][-40:], sys.argv[2], "ctx", ctx)
for M in (1, 4, 10):
    f, o = min(res[(M, True)]), min(res[(M, False)])
    print(f"rows {M}: fused {f:.2f} ms, op-by-op {o:.2f} ms, {o/f:.2f}x")
