import sys, time, glob, importlib.util, torch
torch.set_num_threads(int(sys.argv[2]))
so = glob.glob("/tmp/w8build/attn_exp/attn_exp*.so")[0]
spec = importlib.util.spec_from_file_location("attn_exp", so); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
L = int(sys.argv[1]); DT = getattr(torch, sys.argv[3]) if len(sys.argv) > 3 else torch.bfloat16
for rows in (1, 10):
    q = torch.randn(rows, 14, 64).to(DT); k = torch.randn(2, L + rows, 64).to(DT); v = torch.randn(2, L + rows, 64).to(DT)
    vis = torch.ones(rows, L + rows, dtype=torch.bool); vis[:, L:] = torch.ones(rows, rows, dtype=torch.bool).tril()
    res = {}
    for mode in (0, 1, 2):
        for _ in range(3): m.attention(q, k, v, vis, 0.125, mode)
        best = 1e9
        for rep in range(5):
            t = time.perf_counter()
            for _ in range(50): m.attention(q, k, v, vis, 0.125, mode)
            best = min(best, (time.perf_counter() - t) / 50)
        res[mode] = best * 1e6
    print(f"rows {rows} ctx {L}: full {res[0]:.1f} us, no PV {res[1]:.1f}, no QK {res[2]:.1f}")
