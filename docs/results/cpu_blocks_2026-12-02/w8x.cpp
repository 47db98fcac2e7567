// Tile experiments for the W8A8 kernel: same arithmetic (bits) as w8a8_cpu.cpp, other tiles.
#include "/work/main/esp_engine/kernels/w8a8_cpu.cpp"
#pragma GCC push_options
#pragma GCC target("avx512vnni")
namespace {
template <int B, int R, int C, bool MEM>
inline void tile2(const int8_t* p, int64_t ldp, const float* scale, const int32_t* start, int64_t groups,
                  const uint8_t* w, int64_t bs, float* out /* [R][B][16] */) {
  alignas(64) float facc[R][B][16];
  __m512 racc[MEM ? 1 : R][MEM ? 1 : B];
  if (MEM) { for (int m = 0; m < R; ++m) for (int j = 0; j < B; ++j) _mm512_store_ps(facc[m][j], _mm512_setzero_ps()); }
  else { for (int m = 0; m < (MEM ? 1 : R); ++m) for (int j = 0; j < (MEM ? 1 : B); ++j) racc[m][j] = _mm512_setzero_ps(); }
  for (int64_t g = 0; g < groups; ++g) {
    __m512i s[R][B][C];
    _Pragma("GCC unroll 16") for (int m = 0; m < R; ++m) {
      const __m512i s0 = _mm512_set1_epi32(start[m * groups + g]);
      _Pragma("GCC unroll 16") for (int j = 0; j < B; ++j) { s[m][j][0] = s0; for (int c = 1; c < C; ++c) s[m][j][c] = _mm512_setzero_si512(); }
    }
    const uint8_t* wg = w + g * kGroup * kLanes;
    const int8_t* pg = p + g * kGroup;
    _Pragma("GCC unroll 16") for (int i = 0; i < kStepsPerGroup; i += C) {
      _Pragma("GCC unroll 16") for (int c = 0; c < C; ++c) {
        __m512i wv[B];
        _Pragma("GCC unroll 16") for (int j = 0; j < B; ++j) wv[j] = _mm512_loadu_si512((const void*)(wg + j * bs + (i + c) * 64));
        _Pragma("GCC unroll 16") for (int m = 0; m < R; ++m) {
          int32_t quad;
          std::memcpy(&quad, pg + m * ldp + kQuad * (i + c), sizeof(quad));
          const __m512i xb = _mm512_set1_epi32(quad);
          _Pragma("GCC unroll 16") for (int j = 0; j < B; ++j) s[m][j][c] = _mm512_dpbusd_epi32(s[m][j][c], wv[j], xb);
        }
      }
    }
    _Pragma("GCC unroll 16") for (int m = 0; m < R; ++m) {
      const __m512 a = _mm512_set1_ps(scale[m * groups + g]);
      _Pragma("GCC unroll 16") for (int j = 0; j < B; ++j) {
        __m512i t = s[m][j][0];
        _Pragma("GCC unroll 16") for (int c = 1; c < C; ++c) t = _mm512_add_epi32(t, s[m][j][c]);
        if (MEM) _mm512_store_ps(facc[m][j], _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), a, _mm512_load_ps(facc[m][j])));
        else racc[MEM ? 0 : m][MEM ? 0 : j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), a, racc[MEM ? 0 : m][MEM ? 0 : j]);
      }
    }
  }
  _Pragma("GCC unroll 16") for (int m = 0; m < R; ++m) for (int j = 0; j < B; ++j)
    _mm512_store_ps(out + (m * B + j) * 16, MEM ? _mm512_load_ps(facc[m][j]) : racc[MEM ? 0 : m][MEM ? 0 : j]);
}

template <int B, int R, int C, bool MEM, class O>
void finish(const Problem& pr, const QuantizedRows& xq, const uint8_t* wt, const float* sp, const float* bp, O* yp,
            int64_t b0, int blocks, int64_t m0) {
  alignas(64) float out[R][B][16];
  const int64_t groups = xq.groups, ldp = xq.k_pad;
  const int8_t* p = xq.p.data() + m0 * ldp;
  const float* scale = xq.scale.data() + m0 * groups;
  const int32_t* start = xq.start.data() + m0 * groups;
  if (blocks == B) tile2<B, R, C, MEM>(p, ldp, scale, start, groups, wt, pr.block_stride, &out[0][0][0]);
  else for (int j = 0; j < blocks; ++j) {
    alignas(64) float one[R][1][16];
    tile2<1, R, C, MEM>(p, ldp, scale, start, groups, wt + j * pr.block_stride, pr.block_stride, &one[0][0][0]);
    for (int m = 0; m < R; ++m) std::memcpy(out[m][j], one[m][0], 64);
  }
  for (int m = 0; m < R; ++m)
    for (int j = 0; j < blocks; ++j) {
      const int64_t n0 = (b0 + j) * kLanes;
      __m512 v = _mm512_mul_round_ps(_mm512_load_ps(out[m][j]), _mm512_loadu_ps(sp + n0), kRound);
      if (bp) v = _mm512_add_ps(v, _mm512_loadu_ps(bp + n0));
      esp::store16(yp + (m0 + m) * pr.n_out + n0, v, (int)std::min<int64_t>(kLanes, pr.n_out - n0));
    }
}

template <int B, int R, int C, bool MEM, class O>
void dispatch(int rr, const Problem& pr, const QuantizedRows& xq, const uint8_t* wt, const float* sp, const float* bp, O* yp,
            int64_t b0, int blocks, int64_t m0) {
  if (rr == R) finish<B, R, C, MEM>(pr, xq, wt, sp, bp, yp, b0, blocks, m0);
  else if constexpr (R > 1) dispatch<B, R - 1, C, MEM>(rr, pr, xq, wt, sp, bp, yp, b0, blocks, m0);
}

template <int B, int R, int C, bool MEM, class O>
void run2(const Problem& pr, const QuantizedRows& xq, const uint8_t* wp, const float* sp, const float* bp,
          O* yp, int64_t first, int64_t last) {
  for (int64_t b0 = first; b0 < last; b0 += B) {
    const int blocks = (int)std::min<int64_t>(B, last - b0);
    const uint8_t* wt = wp + b0 * pr.block_stride;
    for (int64_t m0 = 0; m0 < pr.rows; m0 += R) {
      const int rr = (int)std::min<int64_t>(R, pr.rows - m0);
      dispatch<B, R, C, MEM>(rr, pr, xq, wt, sp, bp, yp, b0, blocks, m0);
    }
  }
}


// The shipped tile plus software prefetch of another weight range (pf; nullptr: none).
template <int blocks, int max_rows>
inline void tile_pf(const QuantizedRows& xq, int64_t row0, int rows, const uint8_t* w, int64_t block_stride,
                 __m512 (&acc)[max_rows][blocks], const uint8_t* pf, int pf_blocks, int hint) {
  for (int m = 0; m < max_rows; ++m)
    for (int j = 0; j < blocks; ++j) acc[m][j] = _mm512_setzero_ps();
  const int64_t groups = xq.groups, ldp = xq.k_pad;
  const int8_t* p = xq.p.data() + row0 * ldp;
  const float* scale = xq.scale.data() + row0 * groups;
  const int32_t* start = xq.start.data() + row0 * groups;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i sums[max_rows][blocks];
    for (int m = 0; m < max_rows; ++m) {
      if (m >= rows) break;
      const __m512i s0 = _mm512_set1_epi32(start[m * groups + g]);
      for (int j = 0; j < blocks; ++j) sums[m][j] = s0;
    }
    const uint8_t* wg = w + g * kGroup * kLanes;
    const int8_t* pg = p + g * kGroup;
    if (hint == 3) {
      for (int j = 0; j < blocks; ++j)
        for (int i = 0; i < kStepsPerGroup; ++i)
          _mm_prefetch((const char*)(wg + j * block_stride + i * 64 + 4 * kGroup * kLanes), _MM_HINT_T0);
    } else if (pf) {
      const uint8_t* pg_ = pf + g * kGroup * kLanes;
      for (int j = 0; j < pf_blocks; ++j)
        for (int i = 0; i < kStepsPerGroup; ++i) {
          if (hint == 1) _mm_prefetch((const char*)(pg_ + j * block_stride + i * 64), _MM_HINT_T1);
          else if (hint == 0) _mm_prefetch((const char*)(pg_ + j * block_stride + i * 64), _MM_HINT_T0);
          else _mm_prefetch((const char*)(pg_ + j * block_stride + i * 64), _MM_HINT_T2);
        }
    }
    for (int i = 0; i < kStepsPerGroup; ++i) {
      __m512i wv[blocks];
      for (int j = 0; j < blocks; ++j) wv[j] = _mm512_loadu_si512((const void*)(wg + j * block_stride + i * 64));
      for (int m = 0; m < max_rows; ++m) {
        if (m >= rows) break;
        int32_t quad;
        std::memcpy(&quad, pg + m * ldp + kQuad * i, sizeof(quad));
        const __m512i xb = _mm512_set1_epi32(quad);
        for (int j = 0; j < blocks; ++j) sums[m][j] = _mm512_dpbusd_epi32(sums[m][j], wv[j], xb);
      }
    }
    for (int m = 0; m < max_rows; ++m) {
      if (m >= rows) break;
      const __m512 a = _mm512_set1_ps(scale[m * groups + g]);
      for (int j = 0; j < blocks; ++j) acc[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[m][j]), a, acc[m][j]);
    }
  }
}

// mode 0: prefetch the next block range in every row tile; 1: only in the first; 2: split
// the next range's blocks over the row tiles.
template <int kBlocks, int kRows, class O>
void run_pf(const Problem& pr, const QuantizedRows& xq, const uint8_t* wp, const float* sp, const float* bp,
                O* yp, int64_t first, int64_t last, int mode, int hint) {
  __m512 acc[kRows][kBlocks];
  const int64_t tiles = (pr.rows + kRows - 1) / kRows;
  for (int64_t b0 = first; b0 < last; b0 += kBlocks) {
    const int blocks = (int)std::min<int64_t>(kBlocks, last - b0);
    const int64_t nb0 = b0 + kBlocks;
    const int next_blocks = (int)std::max<int64_t>(0, std::min<int64_t>(kBlocks, last - nb0));
    for (int64_t m0 = 0, t = 0; m0 < pr.rows; m0 += kRows, ++t) {
      const int tile_rows = (int)std::min<int64_t>(kRows, pr.rows - m0);
      const uint8_t* wt = wp + b0 * pr.block_stride;
      const uint8_t* pf = nullptr; int pfb = 0;
      if (next_blocks > 0 && (tiles > 1 || mode == 3)) {
        if (mode == 0) { pf = wp + nb0 * pr.block_stride; pfb = next_blocks; }
        else if (mode == 1 && t == 0) { pf = wp + nb0 * pr.block_stride; pfb = next_blocks; }
        else if (mode == 2 || mode == 3) {
          // blocks [t*nb/tiles, (t+1)*nb/tiles)
          const int lo = (int)(t * next_blocks / tiles), hi = (int)((t + 1) * next_blocks / tiles);
          if (hi > lo) { pf = wp + (nb0 + lo) * pr.block_stride; pfb = hi - lo; }
        }
      }
      if (blocks == kBlocks) {
        tile_pf<kBlocks, kRows>(xq, m0, tile_rows, wt, pr.block_stride, acc, pf, pfb, hint);
      } else {
        for (int j = 0; j < blocks; ++j) {
          __m512 one[kRows][1];
          tile_pf<1, kRows>(xq, m0, tile_rows, wt + j * pr.block_stride, pr.block_stride, one, nullptr, 0, hint);
          for (int m = 0; m < tile_rows; ++m) acc[m][j] = one[m][0];
        }
      }
      for (int m = 0; m < tile_rows; ++m)
        for (int j = 0; j < blocks; ++j) {
          const int64_t n0 = (b0 + j) * kLanes;
          __m512 v = _mm512_mul_round_ps(acc[m][j], _mm512_loadu_ps(sp + n0), kRound);
          if (bp) v = _mm512_add_ps(v, _mm512_loadu_ps(bp + n0));
          esp::store16(yp + (m0 + m) * pr.n_out + n0, v, (int)std::min<int64_t>(kLanes, pr.n_out - n0));
        }
    }
  }
}

template <class T, class O>
void raw2(int variant, const T* x, int64_t rows, int64_t k, const uint8_t* packed, int64_t nblocks, int64_t steps,
          int64_t n_out, const float* scales, const float* bias, O* y) {
  if (variant == 0) return w8a8_raw(x, rows, k, packed, nblocks, steps, n_out, scales, bias, y);
  const int64_t k_pad = steps * kQuad;
  const QuantizedRows xq = quantize_rows(x, rows, k, k_pad);
  const Problem pr{rows, n_out, steps * kLanes * kQuad};
  at::parallel_for(0, nblocks, 1, [&](int64_t first, int64_t last) {
    switch (variant) {
      case 1: run2<6, 4, 1, true, O>(pr, xq, packed, scales, bias, y, first, last); break;
      case 2: run2<4, 3, 2, true, O>(pr, xq, packed, scales, bias, y, first, last); break;
      case 3: run2<8, 3, 1, true, O>(pr, xq, packed, scales, bias, y, first, last); break;
      case 4: run2<4, 2, 2, false, O>(pr, xq, packed, scales, bias, y, first, last); break;
      case 5: run2<3, 3, 2, false, O>(pr, xq, packed, scales, bias, y, first, last); break;
      case 6: run2<4, 5, 1, true, O>(pr, xq, packed, scales, bias, y, first, last); break;
      case 7: run2<5, 5, 1, true, O>(pr, xq, packed, scales, bias, y, first, last); break;
      case 8: run2<3, 4, 1, false, O>(pr, xq, packed, scales, bias, y, first, last); break;
      case 10: case 11: case 12: case 13: case 14: case 15: case 16: case 17: case 18: {
        const int mode = (variant - 10) % 3, hint = (variant - 10) / 3;
        if (rows <= 3) run_pf<4, 3, O>(pr, xq, packed, scales, bias, y, first, last, mode, hint);
        else run_pf<3, 4, O>(pr, xq, packed, scales, bias, y, first, last, mode, hint); break; }
      case 19: case 20: {
        const int hint = variant == 19 ? 0 : 2;
        if (rows <= 3) run_pf<4, 3, O>(pr, xq, packed, scales, bias, y, first, last, 3, hint);
        else run_pf<3, 4, O>(pr, xq, packed, scales, bias, y, first, last, 3, hint); break; }
      case 21: case 22: case 23:
        if (rows == 1 && variant == 21) run_pf<8, 1, O>(pr, xq, packed, scales, bias, y, first, last, 0, 0);
        else if (rows == 1 && variant == 23) run_pf<6, 1, O>(pr, xq, packed, scales, bias, y, first, last, 0, 0);
        else if (rows <= 3) run_pf<4, 3, O>(pr, xq, packed, scales, bias, y, first, last, 1, 0);
        else run_pf<3, 4, O>(pr, xq, packed, scales, bias, y, first, last, 3, 0); break;
      case 24:
        if (rows == 1) run_pf<6, 1, O>(pr, xq, packed, scales, bias, y, first, last, 0, 0);
        else if (rows <= 3) run_pf<4, 3, O>(pr, xq, packed, scales, bias, y, first, last, 3, 0);
        else run_pf<3, 4, O>(pr, xq, packed, scales, bias, y, first, last, 3, 0); break;
      case 25:
        if (rows == 1) run_pf<6, 1, O>(pr, xq, packed, scales, bias, y, first, last, 3, 0);
        else if (rows <= 3) run_pf<4, 3, O>(pr, xq, packed, scales, bias, y, first, last, 3, 0);
        else run_pf<3, 4, O>(pr, xq, packed, scales, bias, y, first, last, 3, 0); break;
      case 26:
        if (rows == 1) run_pf<6, 1, O>(pr, xq, packed, scales, bias, y, first, last, 0, 0);
        else if (rows <= 3) run_pf<6, 2, O>(pr, xq, packed, scales, bias, y, first, last, 3, 0);
        else run_pf<3, 4, O>(pr, xq, packed, scales, bias, y, first, last, 3, 0); break;
      case 27:
        if (rows == 1) run_pf<6, 1, O>(pr, xq, packed, scales, bias, y, first, last, 0, 3);
        else if (rows <= 3) run_pf<4, 3, O>(pr, xq, packed, scales, bias, y, first, last, 0, 3);
        else run_pf<3, 4, O>(pr, xq, packed, scales, bias, y, first, last, 3, 0); break;
      case 9: run2<6, 2, 2, true, O>(pr, xq, packed, scales, bias, y, first, last); break;
    }
  });
}
}  // namespace
#pragma GCC pop_options

torch::Tensor lin2(const torch::Tensor& x, const torch::Tensor& packed, int64_t n_out, const torch::Tensor& scales,
                   int64_t variant) {
  const int64_t nblocks = packed.size(0), steps = packed.size(1);
  torch::Tensor y = torch::empty({x.size(0), n_out}, x.options());
  if (x.scalar_type() == torch::kFloat)
    raw2(variant, x.data_ptr<float>(), x.size(0), x.size(1), packed.data_ptr<uint8_t>(), nblocks, steps, n_out,
         scales.data_ptr<float>(), nullptr, y.data_ptr<float>());
  else
    raw2(variant, x.data_ptr<at::BFloat16>(), x.size(0), x.size(1), packed.data_ptr<uint8_t>(), nblocks, steps, n_out,
         scales.data_ptr<float>(), nullptr, y.data_ptr<at::BFloat16>());
  return y;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("pack", &pack_w8a8); m.def("lin2", &lin2); }
