// Prototype: int8 weights (stored u8 = q + 128) times int8 activations (per-row scale), AVX512-VNNI.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>

constexpr int kB = 4, kR = 6;

template <int blocks, int max_rows>
inline void tile(const int8_t* x, int64_t ldx, int rows, const uint8_t* w, int64_t bstride, int64_t steps,
                 __m512i (&acc)[max_rows][blocks]) {
  for (int m = 0; m < max_rows; ++m) for (int j = 0; j < blocks; ++j) acc[m][j] = _mm512_setzero_si512();
  for (int64_t i = 0; i < steps; ++i) {
    __m512i wv[blocks];
    for (int j = 0; j < blocks; ++j) wv[j] = _mm512_loadu_si512((const void*)(w + j * bstride + i * 64));
    for (int m = 0; m < max_rows; ++m) {
      if (m >= rows) break;
      int32_t q4; std::memcpy(&q4, x + m * ldx + 4 * i, 4);
      const __m512i xb = _mm512_set1_epi32(q4);
      for (int j = 0; j < blocks; ++j) acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], wv[j], xb);
    }
  }
}

torch::Tensor pack(const torch::Tensor& q) {  // q int8 [N, K] -> u8 [N/16][K/4][16][4]
  const int64_t n = q.size(0), k = q.size(1), np = (n + 15) / 16 * 16, kp = (k + 3) / 4 * 4;
  auto u = (torch::constant_pad_nd(q.to(torch::kInt), {0, kp - k, 0, np - n}) + 128).to(torch::kByte);
  return u.view({np / 16, 16, kp / 4, 4}).permute({0, 2, 1, 3}).contiguous();
}

torch::Tensor linear(const torch::Tensor& x_in, const torch::Tensor& packed, int64_t n_out, const torch::Tensor& wscale) {
  const int64_t rows = x_in.size(0), k = x_in.size(1), nb = packed.size(0), steps = packed.size(1), kp = steps * 4;
  torch::Tensor xf = x_in.to(torch::kFloat).contiguous();
  torch::Tensor qx = torch::zeros({rows, kp}, torch::kChar);
  std::vector<float> sx(rows); std::vector<int32_t> sum(rows);
  for (int64_t r = 0; r < rows; ++r) {  // per-row quantization (scalar: prototype)
    const float* xr = xf.data_ptr<float>() + r * k; float amax = 0;
    for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(xr[i]));
    const float s = amax > 0 ? amax / 127.f : 1.f; sx[r] = s; int32_t t = 0;
    int8_t* q = qx.data_ptr<int8_t>() + r * kp;
    for (int64_t i = 0; i < k; ++i) { int v = (int)std::nearbyint(xr[i] / s); q[i] = (int8_t)v; t += v; }
    sum[r] = t;
  }
  torch::Tensor y = torch::empty({rows, n_out}, x_in.options());
  const uint8_t* wp = packed.data_ptr<uint8_t>(); const int8_t* xp = qx.data_ptr<int8_t>();
  const float* ws = wscale.data_ptr<float>(); const int64_t bstride = steps * 64;
  at::BFloat16* yb = x_in.scalar_type() == torch::kBFloat16 ? y.data_ptr<at::BFloat16>() : nullptr;
  float* yf = yb ? nullptr : y.data_ptr<float>();
  at::parallel_for(0, nb, 1, [&](int64_t first, int64_t last) {
    __m512i acc[kR][kB];
    for (int64_t b0 = first; b0 < last; b0 += kB) {
      const int blocks = (int)std::min<int64_t>(kB, last - b0);
      for (int64_t m0 = 0; m0 < rows; m0 += kR) {
        const int tr = (int)std::min<int64_t>(kR, rows - m0);
        if (blocks == kB) tile<kB, kR>(xp + m0 * kp, kp, tr, wp + b0 * bstride, bstride, steps, acc);
        else for (int j = 0; j < blocks; ++j) { __m512i one[kR][1]; tile<1, kR>(xp + m0 * kp, kp, tr, wp + (b0 + j) * bstride, bstride, steps, one); for (int m = 0; m < tr; ++m) acc[m][j] = one[m][0]; }
        for (int m = 0; m < tr; ++m) for (int j = 0; j < blocks; ++j) {
          const int64_t n0 = (b0 + j) * 16; const int r = (int)(m0 + m);
          __m512i a = _mm512_sub_epi32(acc[m][j], _mm512_set1_epi32(128 * sum[r]));
          __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(_mm512_set1_ps(sx[r]), _mm512_loadu_ps(ws + n0)));
          const __mmask16 mk = n_out - n0 >= 16 ? 0xffff : (__mmask16)((1u << (n_out - n0)) - 1);
          if (yb) _mm256_mask_storeu_epi16((void*)(yb + r * n_out + n0), mk, (__m256i)_mm512_cvtneps_pbh(v));
          else _mm512_mask_storeu_ps(yf + r * n_out + n0, mk, v);
        }
      }
    }
  });
  return y;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("pack", &pack); m.def("linear", &linear); }
