import torch, time, sys
torch.set_num_threads(2)
from esp_engine import cpu_kernels
from esp_engine.loader import load_model
from esp_engine.kv_cache import KVCache
lm = load_model(sys.argv[1], dtype=sys.argv[2]); m = lm.model; s = m.shape
real = cpu_kernels.supports_attention
def use(kernel):
    cpu_kernels.supports_attention = real if kernel else (lambda *a: False)
res={}
for ctx in (256, 1024):
    c = KVCache.standalone(s.num_layers, s.num_kv_heads, s.head_dim, ctx+64, m.dtype, "cpu")
    ids = torch.randint(0, 1000, (ctx+40,))
    m.forward(c, m.embed(ids[:ctx]), torch.arange(ctx), None)
    def step(M):
        mask = None if M == 1 else torch.ones(M, M, dtype=torch.bool).tril()
        e = m.embed(ids[ctx:ctx+M]); h = m.forward(c, e, torch.arange(ctx, ctx + M), mask); m.logits(h[-1:] if M==1 else h); c.length = ctx
    for rnd in range(3):
        for b in ("kernel","torch"):
            use(b=="kernel")
            for M in (1, 10, 30):
                for _ in range(2): step(M)
                t = time.perf_counter(); n = 6
                for _ in range(n): step(M)
                res.setdefault((b,ctx,M), []).append((time.perf_counter()-t)/n*1e3)
            c.length=0; t=time.perf_counter(); m.forward(c, m.embed(ids[:ctx]), torch.arange(ctx), None)
            res.setdefault((b,ctx,"prefill"),[]).append((time.perf_counter()-t)*1e3); c.length=ctx
for key in sorted({k[1:] for k in res}, key=str):
    o=min(res[("kernel",)+key]); d=min(res[("torch",)+key])
    print(sys.argv[1][-22:], sys.argv[2], f"ctx {key[0]} rows {key[1]}: kernel {o:.2f} ms, torch ops {d:.2f} ms, torch/kernel {d/o:.2f}", flush=True)
