import sys, time, torch
sys.path.insert(0, "/work/main")
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
from esp_engine import cpu_kernels
mod = cpu_kernels.status().module
L = int(sys.argv[1]) if len(sys.argv) > 1 else 256
for dt in (torch.bfloat16,):
    k = torch.randn(2, L + 16, 64).to(dt); v = torch.randn(2, L + 16, 64).to(dt)
    for rows in (1, 2, 4, 10, 16):
        q = torch.randn(rows, 14, 64).to(dt)
        vis = torch.ones(rows, L + 16, dtype=torch.bool); vis[:, L:] = torch.ones(rows, 16, dtype=torch.bool)[:, :16].tril(L - L)
        kk, vv = k[:, :L + rows], v[:, :L + rows]; vis = torch.ones(rows, L + rows, dtype=torch.bool); vis[:, L:] = torch.ones(rows, rows, dtype=torch.bool).tril()
        for _ in range(3): mod.attention(q, kk, vv, vis, 0.125)
        t = time.perf_counter(); n = 200
        for _ in range(n): mod.attention(q, kk, vv, vis, 0.125)
        dt_ = (time.perf_counter() - t) / n
        print(f"{dt} rows {rows:2d} context {L}: {dt_*1e6:7.1f} us per layer, x24 = {dt_*24e3:.2f} ms", flush=True)
