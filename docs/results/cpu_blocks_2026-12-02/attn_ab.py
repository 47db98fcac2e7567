import sys, time, glob, importlib.util, torch
sys.path.insert(0, "/work/main")
from esp_engine import cpu_kernels
torch.set_num_threads(int(sys.argv[1]))
so = glob.glob("/tmp/w8build/attn_exp/attn_exp*.so")[0]
spec = importlib.util.spec_from_file_location("attn_exp", so); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
for dt in (torch.bfloat16, torch.float32):
  for heads, kvh, dim in ((14, 2, 64), (9, 3, 64)):
    for L in (256, 1024):
      for rows in (1, 10):
        q = torch.randn(rows, heads, dim).to(dt); k = torch.randn(kvh, L + rows, dim).to(dt); v = torch.randn(kvh, L + rows, dim).to(dt)
        vis = torch.ones(rows, L + rows, dtype=torch.bool); vis[:, L:] = torch.ones(rows, rows, dtype=torch.bool).tril()
        fs = {"before": lambda: m.attention(q, k, v, vis, 0.125, 0), "after": lambda: cpu_kernels.attention(q, k, v, vis, 0.125)}
        best = {x: 1e9 for x in fs}
        for rep in range(6):
            for name, f in fs.items():
                f(); t = time.perf_counter()
                for _ in range(30): f()
                best[name] = min(best[name], (time.perf_counter() - t) / 30)
        print(f"{str(dt)[6:]:9s} heads {heads}/{kvh} ctx {L:4d} rows {rows:2d}: before {best['before']*1e6:6.1f} us, after {best['after']*1e6:6.1f} us ({best['before']/best['after']:.2f}x)", flush=True)
