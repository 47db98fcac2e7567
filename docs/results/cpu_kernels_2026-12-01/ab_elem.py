import torch, time, sys
torch.set_num_threads(2)
from esp_engine.loader import load_model
from esp_engine.kv_cache import KVCache
from esp_engine.model import _RMSNorm
lm = load_model(sys.argv[1], dtype=sys.argv[2]); m = lm.model; s = m.shape
norms=[x for x in m.modules() if isinstance(x,_RMSNorm)]
def use(k):
    for n in norms: n.use_kernel=k
    for l in m.layers: l.silu_mul_kernel=k
ctx=256
c = KVCache.standalone(s.num_layers, s.num_kv_heads, s.head_dim, ctx+64, m.dtype, "cpu")
ids = torch.randint(0, 1000, (ctx+40,))
m.forward(c, m.embed(ids[:ctx]), torch.arange(ctx), None)
def step(M):
    mask = None if M == 1 else torch.ones(M, M, dtype=torch.bool).tril()
    e = m.embed(ids[ctx:ctx+M]); h = m.forward(c, e, torch.arange(ctx, ctx + M), mask); m.logits(h[-1:] if M==1 else h); c.length = ctx
res={}
for rnd in range(4):
    for b in ("kernel","torch"):
        use(b=="kernel")
        for M in (1, 4, 10, 30):
            for _ in range(2): step(M)
            t = time.perf_counter(); n = 8
            for _ in range(n): step(M)
            res.setdefault((b,M), []).append((time.perf_counter()-t)/n*1e3)
for M in (1,4,10,30):
    o=min(res[("kernel",M)]); d=min(res[("torch",M)])
    print(sys.argv[1][-22:], sys.argv[2], f"rows {M}: kernels {o:.2f} ms, torch ops {d:.2f} ms, torch/kernels {d/o:.2f}", flush=True)
