import sys, os, time, glob, random, statistics, importlib.util, torch
torch.set_num_threads(2)
mods = {}
for name in sys.argv[1].split(","):
    so = glob.glob(f"/tmp/w8build/{name}/{name}*.so")[0]
    spec = importlib.util.spec_from_file_location(name, so); mods[name] = importlib.util.module_from_spec(spec); spec.loader.exec_module(mods[name])
m = mods[sys.argv[1].split(",")[0]]
V = sys.argv[2].split(",")  # module:variant
ROWS = [int(r) for r in (sys.argv[3].split(",") if len(sys.argv) > 3 else (1, 4, 6, 10, 16))]
REPS = int(os.environ.get("REPS", 12))
shapes = [(1152, 896), (896, 896), (9728, 896), (896, 4864)]; L = 24
Ws = [[m.pack(torch.randint(-127, 128, sh, dtype=torch.int8)) for sh in shapes] for _ in range(L)]
Ws.append([m.pack(torch.randint(-127, 128, (151936, 896), dtype=torch.int8))])
Ns = [[n for n, _ in shapes]] * L + [[151936]]
Ss = [[torch.rand(p.shape[0] * 16) for p in ws] for ws in Ws]
for rows in ROWS:
    xs = {k: torch.randn(rows, k).to(torch.bfloat16) for k in (896, 4864)}
    def f(v):
        for ws, ns, ss in zip(Ws, Ns, Ss):
            for p, n, s in zip(ws, ns, ss): mods[v.split(':')[0]].lin2(xs[p.shape[1] * 4], p, n, s, int(v.split(':')[1]))
    for v in V: f(v)
    t_ = {v: [] for v in V}
    for rep in range(REPS):
        order = V[:]; random.shuffle(order)
        for v in order:
            t = time.perf_counter(); f(v); t_[v].append(time.perf_counter() - t)
    ratio = {v: statistics.median(a / b for a, b in zip(t_[v], t_[V[0]])) for v in V}
    print(f"{rows:2d} rows:", "  ".join(f"{v} {statistics.median(t_[v]) * 1e3:.1f} ({ratio[v]:.2f})" for v in V), flush=True)
