# correctness + timing of standalone w8a8 builds: python bench_w8.py name1 name2 ...
import sys, os, time, importlib.util, glob, torch
torch.set_num_threads(2)
sys.path.insert(0, "/work/main")
from esp_engine import cpu_kernels as ck
mods = {}
for name in sys.argv[1:]:
    so = glob.glob(f"/tmp/w8build/{name}/{name}*.so")[0]
    spec = importlib.util.spec_from_file_location(name, so); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    mods[name] = m
# correctness: against a float64 reference of the same scheme
def ref(x, q, s, G=32):
    xf = x.double(); k = xf.shape[1]; kp = (k + G - 1) // G * G
    xf = torch.nn.functional.pad(xf, (0, kp - k)).view(xf.shape[0], -1, G)
    amax = xf.abs().amax(-1, keepdim=True).float()
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    p = torch.round(xf.float() * inv).double(); a = (amax / 127).double()
    wq = torch.nn.functional.pad(q.double(), (0, kp - k)).view(q.shape[0], -1, G)
    return torch.einsum("rgk,ngk,rg->rn", p, wq, a[..., 0]) * s.double()
for name, m in mods.items():
    for dt in (torch.float32, torch.bfloat16):
        for (n, k) in ((100, 96), (37, 70), (300, 576)):
            q = torch.randint(-127, 128, (n, k), dtype=torch.int8); s = torch.rand(n) / 50
            x = torch.randn(13, k).to(dt); packed = m.pack(q); sp = torch.nn.functional.pad(s, (0, packed.shape[0]*16 - n))
            got = m.linear(x, packed, n, None, True, sp)
            r = ref(x, q, s, int(name.split("_g")[-1]) if "_g" in name else 32)
            err = ((got.double() - r).abs().max() / r.abs().max()).item()
            alone = torch.cat([m.linear(x[i:i+1], packed, n, None, True, sp) for i in range(13)])
            assert torch.equal(alone, got), "row invariance"
            assert err < 1e-6 or "_g64" in name, (err, dt, n, k)
    print(name, "correct, row-invariant")
shapes=[(1152,896),(896,896),(9728,896),(896,4864)]; head=(151936,896); L=24
dt = torch.bfloat16
Ws=[[torch.randint(-127,128,(o,i),dtype=torch.int8) for (o,i) in shapes] for _ in range(L)]+[[torch.randint(-127,128,head,dtype=torch.int8)]]
allshapes=[shapes]*L+[[head]]
PA=[[(ck.pack(w, activations=dt), w.shape[0], torch.rand(((w.shape[0]+15)//16)*16)) for w in ws] for ws in Ws]
first = next(iter(mods.values()))
PV=[[(first.pack(w), w.shape[0], torch.rand(((w.shape[0]+15)//16)*16)) for w in ws] for ws in Ws]
del Ws
for rows in (1, 2, 4, 6, 10, 16, 30):
    xs={i:torch.randn(rows,i).to(dt) for sh in allshapes for (o,i) in sh}
    fns = {}
    def fa():
        for sh,ws in zip(allshapes,PA):
            for (o,i),(p,n,sc) in zip(sh,ws): ck.linear(xs[i],p,n,None,scales=sc)
    fns["int8 w"] = fa
    for name, m in mods.items():
        def fv(m=m):
            for sh,ws in zip(allshapes,PV):
                for (o,i),(p,n,sc) in zip(sh,ws): m.linear(xs[i],p,n,None,False,sc)
        fns[name] = fv
    r={}
    for rep in range(4):
        for name,f in fns.items():
            f(); n=5; t=time.perf_counter()
            for _ in range(n): f()
            r.setdefault(name,[]).append((time.perf_counter()-t)/n*1e3)
    print(rows, "rows:", ", ".join(f"{k} {min(v):.2f}" for k, v in r.items()), flush=True)
