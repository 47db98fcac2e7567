import torch, time, sys
torch.set_num_threads(2)
from esp_engine.loader import load_model
from esp_engine.kv_cache import KVCache
from esp_engine import cpu_kernels as ck
lm = load_model(sys.argv[1], dtype=sys.argv[2]); m = lm.model; s = m.shape
ctx = 64
c = KVCache.standalone(s.num_layers, s.num_kv_heads, s.head_dim, ctx + 100, m.dtype, "cpu")
ids = torch.randint(0, 1000, (ctx + 64,))
m.forward(c, m.embed(ids[:ctx]), torch.arange(ctx), None)
h = torch.randn(1, s.hidden_size).to(m.dtype)
lins = [l for L in m.layers for l in (L.wqkv, L.wo, L.w_gate_up, L.w_down)]
xs = {l: torch.randn(1, l.in_features).to(m.dtype) for l in lins}
def fwd(): m.forward(c, m.embed(ids[ctx:ctx+1]), torch.arange(ctx, ctx+1), None); c.length = ctx
def lin_only():
    for l in lins: ck.linear(xs[l], l.packed, l.out_features, l.bias)
def head(): m.logits(h)
def head_lin(): ck.linear(h, m.lm_head.packed, m.lm_head.out_features, None)
res = {}
for r in range(5):
    for name, f in (("forward", fwd), ("layer linears", lin_only), ("logits", head), ("head linear", head_lin)):
        for _ in range(2): f()
        t = time.perf_counter(); n = 10
        for _ in range(n): f()
        res.setdefault(name, []).append((time.perf_counter() - t) / n * 1e3)
for k, v in res.items(): print(f"{k:14s} min {min(v):.2f} ms  median {sorted(v)[2]:.2f}")
