import torch, time, sys
torch.set_num_threads(2)
from esp_engine.loader import load_model
from esp_engine.kv_cache import KVCache
from esp_engine.model import PackedLinear
lm = load_model(sys.argv[1], dtype=sys.argv[2]); m = lm.model; s = m.shape
lins=[x for x in m.modules() if type(x) is PackedLinear]
store={id(l):{"ours":l.packed,"onednn":torch.ops.mkldnn._reorder_linear_weight(l.weight.data,8)} for l in lins}
def use(b):
    for l in lins: l.backend=b; l.packed=store[id(l)][b]
c = KVCache.standalone(s.num_layers, s.num_kv_heads, s.head_dim, 1100, m.dtype, "cpu")
ids = torch.randint(0, 1000, (1100,))
res={}
for rnd in range(2):
    for b in ("ours","onednn"):
        use(b)
        for n in (256, 1024):
            c.length=0
            t=time.perf_counter(); h=m.forward(c, m.embed(ids[:n]), torch.arange(n), None); m.logits(h[-1:])
            res.setdefault((b,n),[]).append(time.perf_counter()-t)
for n in (256,1024):
    o=min(res[("ours",n)]); d=min(res[("onednn",n)])
    print(sys.argv[1][-28:], sys.argv[2], f"prefill {n}: ours {o:.3f} s, onednn {d:.3f} s, ours/onednn {o/d:.2f}", flush=True)
