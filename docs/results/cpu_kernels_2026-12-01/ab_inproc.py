import torch, time, sys
torch.set_num_threads(2)
from esp_engine.loader import load_model
from esp_engine.kv_cache import KVCache
from esp_engine.model import PackedLinear
lm = load_model(sys.argv[1], dtype=sys.argv[2]); m = lm.model; s = m.shape
lins=[x for x in m.modules() if type(x) is PackedLinear]
store={}
for l in lins:
    store[id(l)]={"ours":l.packed,"onednn":torch.ops.mkldnn._reorder_linear_weight(l.weight.data,8)}
def use(b):
    for l in lins: l.backend=b; l.packed=store[id(l)][b]
ctx=int(sys.argv[3]) if len(sys.argv)>3 else 256
c = KVCache.standalone(s.num_layers, s.num_kv_heads, s.head_dim, ctx+64, m.dtype, "cpu")
ids = torch.randint(0, 1000, (ctx+40,))
m.forward(c, m.embed(ids[:ctx]), torch.arange(ctx), None)
def step(M):
    mask = None if M == 1 else torch.ones(M, M, dtype=torch.bool).tril()
    e = m.embed(ids[ctx:ctx+M]); h = m.forward(c, e, torch.arange(ctx, ctx + M), mask); m.logits(h[-1:] if M==1 else h); c.length = ctx
res={}
for rnd in range(4):
    for b in ("ours","onednn"):
        use(b)
        for M in (1, 4, 10, 30):
            for _ in range(2): step(M)
            t = time.perf_counter(); n = 8
            for _ in range(n): step(M)
            res.setdefault((b,M), []).append((time.perf_counter()-t)/n*1e3)
for M in (1,4,10,30):
    o=min(res[("ours",M)]); d=min(res[("onednn",M)])
    print(sys.argv[1][-28:], sys.argv[2], f"rows {M}: ours {o:.2f} ms, onednn {d:.2f} ms, onednn/ours {d/o:.2f}", flush=True)
