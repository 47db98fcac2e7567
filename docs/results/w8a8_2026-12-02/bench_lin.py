import sys, glob, importlib.util, time, torch
torch.set_num_threads(2)
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[1]]
sys.argv = sys.argv[1:]
mods = {}
for name in sys.argv[1:]:
    so = glob.glob(f"/tmp/w8build/{name}/{name}*.so")[0]
    spec = importlib.util.spec_from_file_location(name, so); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); mods[name] = m
first = next(iter(mods.values()))
# correctness: 1 row equal across builds
w = torch.randn(1000, 896).to(DT); x = torch.randn(1, 896).to(DT); pk = first.pack(w, 0)
ys = [m.linear(x, pk, 1000, None, False, None) for m in mods.values()]
assert all(torch.equal(ys[0], y) for y in ys), "bits differ"
shapes = [(1152, 896), (896, 896), (9728, 896), (896, 4864)]
P = [[(first.pack(torch.randn(o, i).to(DT), 0), o, i) for (o, i) in shapes] for _ in range(24)] + [[(first.pack(torch.randn(151936, 896).to(DT), 0), 151936, 896)]]
xs = {i: torch.randn(1, i).to(DT) for i in (896, 4864)}
res = {}
for rep in range(8):
    for name, m in mods.items():
        def f():
            for layer in P:
                for p, o, i in layer: m.linear(xs[i], p, o, None, False, None)
        f(); t = time.perf_counter(); n = 4
        for _ in range(n): f()
        res.setdefault(name, []).append((time.perf_counter() - t) / n * 1e3)
for k, v in res.items(): print(f"{k}: min {min(v):.1f} ms, median {sorted(v)[3]:.1f} ms, {1.98e9/min(v)/1e6:.0f} GB/s at min")
