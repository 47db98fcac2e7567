import sys, time, glob, importlib.util, torch
torch.set_num_threads(1)
name = sys.argv[1]
so = glob.glob(f"/tmp/w8build/{name}/{name}*.so")[0]
spec = importlib.util.spec_from_file_location(name, so); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
V = [int(v) for v in sys.argv[2].split(",")]
for (n, k) in ((384, 896), (2304, 896)):
    p = m.pack(torch.randint(-127, 128, (n, k), dtype=torch.int8)); s = torch.rand(p.shape[0] * 16)
    for rows in (1, 4, 8, 10, 12, 16):
        x = torch.randn(rows, k).to(torch.bfloat16); r = {}
        for rep in range(3):
            for v in V:
                m.lin2(x, p, n, s, v); it = max(20, 4000 // rows); t = time.perf_counter()
                for _ in range(it): m.lin2(x, p, n, s, v)
                r.setdefault(v, []).append((time.perf_counter() - t) / it)
        ops = rows * n * k / 64
        print(f"{n}x{k} rows {rows:2d}:", "  ".join(f"v{v} {ops / min(t) / 1e9:.2f}" for v, t in r.items()), "G vpdpbusd/s", flush=True)
