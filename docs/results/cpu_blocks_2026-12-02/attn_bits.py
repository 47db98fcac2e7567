import sys, glob, importlib.util, torch
sys.path.insert(0, "/work/main")
from esp_engine import cpu_kernels
so = glob.glob("/tmp/w8build/attn_old/attn_old*.so")[0]
spec = importlib.util.spec_from_file_location("attn_old", so); old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
torch.manual_seed(0); n = 0
for dt in (torch.float32, torch.bfloat16):
    for heads, kvh, dim in ((14, 2, 64), (9, 3, 64), (8, 8, 64), (4, 1, 128), (6, 2, 32), (5, 1, 48), (12, 2, 128), (2, 1, 256), (16, 2, 64)):
        for rows, L in ((1, 1), (1, 37), (3, 20), (10, 266), (17, 100)):
            if L < rows: continue
            q = torch.randn(rows, heads, dim).to(dt); k = torch.randn(kvh, L, dim).to(dt); v = torch.randn(kvh, L, dim).to(dt)
            for vis in (None, torch.rand(rows, L) > 0.3):
                if vis is not None: vis[:, 0] = True
                a = old.attention(q, k, v, vis, dim ** -0.5); b = cpu_kernels.attention(q, k, v, vis, dim ** -0.5)
                assert torch.equal(a, b), (dt, heads, kvh, dim, rows, L); n += 1
            # strided keys (a cache view)
            kk = torch.randn(kvh, L + 5, dim).to(dt)[:, :L]; vv = torch.randn(kvh, L + 5, dim).to(dt)[:, :L]
            assert torch.equal(old.attention(q, kk, vv, None, 0.1), cpu_kernels.attention(q, kk, vv, None, 0.1)); n += 1
print("same bits in", n, "cases")
