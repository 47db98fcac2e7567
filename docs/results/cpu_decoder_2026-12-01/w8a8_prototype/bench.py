import torch, time, sys, os
torch.set_num_threads(2)
from torch.utils import cpp_extension
import ninja; os.environ["PATH"] = ninja.BIN_DIR + ":" + os.environ["PATH"]
FL = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vnni", "-mfma"]
d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build"); os.makedirs(d, exist_ok=True)
V = cpp_extension.load(name="w8a8p", sources=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "w8a8.cpp")], extra_cflags=FL, extra_ldflags=["-fopenmp"], build_directory=d)
from esp_engine import cpu_kernels as ck
# correctness vs float reference
q = torch.randint(-127, 128, (100, 96), dtype=torch.int8); s = torch.rand(100) / 50; x = torch.randn(5, 96)
ref = x @ (q.float() * s[:, None]).T
got = V.linear(x, V.pack(q), 100, torch.nn.functional.pad(s, (0, 12)))
print("rel err", ((got - ref).abs().max() / ref.abs().max()).item())
shapes=[(1152,896),(896,896),(9728,896),(896,4864)]; head=(151936,896); L=24
dt = torch.bfloat16
Ws=[[torch.randint(-127,128,(o,i),dtype=torch.int8) for (o,i) in shapes] for _ in range(L)]+[[torch.randint(-127,128,head,dtype=torch.int8)]]
allshapes=[shapes]*L+[[head]]
PA=[[(ck.pack(w, activations=dt), w.shape[0], torch.rand(((w.shape[0]+15)//16)*16)) for w in ws] for ws in Ws]
PV=[[(V.pack(w), w.shape[0], torch.rand(((w.shape[0]+15)//16)*16)) for w in ws] for ws in Ws]
del Ws
for rows in (1, 4, 10, 16, 30):
    xs={i:torch.randn(rows,i).to(dt) for sh in allshapes for (o,i) in sh}
    def fa():
        for sh,ws in zip(allshapes,PA):
            for (o,i),(p,n,sc) in zip(sh,ws): ck.linear(xs[i],p,n,None,scales=sc)
    def fv():
        for sh,ws in zip(allshapes,PV):
            for (o,i),(p,n,sc) in zip(sh,ws): V.linear(xs[i],p,n,sc)
    r={}
    for rep in range(4):
        for name,f in (("w8 (bf16 act)",fa),("w8a8 vnni",fv)):
            for _ in range(2): f()
            n=6; t=time.perf_counter()
            for _ in range(n): f()
            r.setdefault(name,[]).append((time.perf_counter()-t)/n*1e3)
    print(rows, "rows:", ", ".join(f"{k} {min(v):.2f} ms" for k, v in r.items()), flush=True)
