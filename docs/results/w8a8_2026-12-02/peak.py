# Peak vpdpbusd / vdpbf16ps / vfmadd throughput on one core, registers only: python peak.py CHAINS (independent
# accumulators; run with 12, the kernel's 3x4 tile, and 24).
import sys
import os, time, torch
from torch.utils import cpp_extension
os.environ["PATH"] = "/work/main/.venv/bin:" + os.environ["PATH"]
src = r'''
#include <torch/extension.h>
#include <immintrin.h>
#pragma GCC target("avx512vnni,avx512bf16")
template <int OP> double run(int64_t iters) {
  __m512i a[CH]; __m512 f[CH];
  for (int i = 0; i < CH; ++i) { a[i] = _mm512_set1_epi32(i); f[i] = _mm512_set1_ps(i); }
  __m512i w = _mm512_set1_epi32(0x01010101), x = _mm512_set1_epi32(0x02020202);
  __m512 wf = _mm512_set1_ps(1e-9f);
  for (int64_t n = 0; n < iters; ++n) {
    for (int i = 0; i < CH; ++i) {
      if (OP == 0) a[i] = _mm512_dpbusd_epi32(a[i], w, x);
      else if (OP == 1) f[i] = _mm512_dpbf16_ps(f[i], (__m512bh)w, (__m512bh)x);
      else f[i] = _mm512_fmadd_ps(f[i], wf, wf);
    }
    asm volatile("" ::: "memory");
  }
  __m512i s = a[0]; __m512 t = f[0];
  for (int i = 1; i < CH; ++i) { s = _mm512_add_epi32(s, a[i]); t = _mm512_add_ps(t, f[i]); }
  return (double)_mm512_reduce_add_epi32(s) + _mm512_reduce_add_ps(t);
}
double bench(int64_t op, int64_t iters) { return op == 0 ? run<0>(iters) : op == 1 ? run<1>(iters) : run<2>(iters); }
'''
CH = int(sys.argv[1]) if len(sys.argv) > 1 else 24
m = cpp_extension.load_inline(f"peak{CH}", cpp_sources=src, functions=["bench"], extra_cflags=["-O2", "-mavx512f", "-mavx512bw", f"-DCH={CH}"], build_directory=None)
iters = 20_000_000
for op, name in ((0, "vpdpbusd"), (1, "vdpbf16ps"), (2, "vfmadd231ps")):
    best = 1e9
    for _ in range(5):
        t = time.perf_counter(); m.bench(op, iters); best = min(best, time.perf_counter() - t)
    print(f"{name}: {iters * CH / best / 1e9:.2f} G zmm instructions/s on one core")
