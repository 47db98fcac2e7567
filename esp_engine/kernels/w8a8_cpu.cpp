// y = x W^T + b with int8 weights and int8 activations (W8A8), for a CPU with AVX512-VNNI (the
// AVX2 build has the packing only).
//
// Without AMX a block of rows costs a CPU its arithmetic: bf16 dot products take 32
// multiply-adds per instruction, VNNI's int8 dot product (vpdpbusd) 64. So the rows a
// speculative step verifies cost less here than in the float or weight-only int8 kernels.
//
// Weights: one symmetric int8 scale per output (quantization.Int8Linear's q and s), stored as
// u8 = q + 128 because vpdpbusd multiplies unsigned by signed bytes. Activations: each row's
// values in groups of kGroup along k, each group with its own scale a = max|x| / 127 and
// p = round(x / a) in [-127, 127]. A group's integer sum over (q + 128) p is exact in int32; its
// start value -128 * sum(p) removes the offset, so it is sum q p exactly. The row's output is
//   y = s * sum over groups g, in order, of (sum_g q p) * a_g   (one fused multiply-add per group)
// then plus the bias. Every step is a function of the row alone, so a row's result is the same
// whatever the rows beside it (the row invariance lossless speculation needs) and whatever the
// tile shape or thread that computes it.
//
// Packed layout: u8 [N/16][K/4][16][4], lane j of vector p holding w[n0 + j, 4p .. 4p + 3]
// (N padded to 16 with zero weights, K to kGroup).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstring>
#include <vector>

#include "ops_cpu.h"
#include "vec_cpu.h"

namespace {
constexpr int kLanes = 16, kQuad = 4, kGroup = esp::kW8A8Group, kStepsPerGroup = kGroup / kQuad;
constexpr int kChunks = kGroup / kLanes;
static_assert(kGroup % kLanes == 0, "a group is whole vectors");
constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
}  // namespace

#if ESP_AVX512
#pragma GCC push_options
#pragma GCC target("avx512vnni")

namespace {


// The activations of `rows` rows quantized: p [rows, k_pad] (zero past k), and per row and group
// its scale a and the integer sum's start value -128 * sum(p).
struct QuantizedRows {
  std::vector<int8_t> p;
  std::vector<float> scale;
  std::vector<int32_t> start;
  int64_t k_pad = 0, groups = 0;
};

template <class T>
QuantizedRows quantize_rows(const T* x, int64_t rows, int64_t k, int64_t k_pad) {
  QuantizedRows out;
  out.k_pad = k_pad;
  out.groups = k_pad / kGroup;
  out.p.assign(rows * k_pad, 0);
  out.scale.resize(rows * out.groups);
  out.start.resize(rows * out.groups);
  at::parallel_for(0, rows, 4, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const T* xr = x + r * k;
      for (int64_t g = 0; g < out.groups; ++g) {
        const int64_t base = g * kGroup;
        __m512 v[kChunks];
        __m512 amax_v = _mm512_setzero_ps();
        for (int c = 0; c < kChunks; ++c) {
          const int64_t at = base + c * kLanes;
          v[c] = esp::load16(xr + at, std::max<int64_t>(0, std::min<int64_t>(kLanes, k - at)));
          amax_v = _mm512_max_ps(amax_v, _mm512_abs_ps(v[c]));
        }
        const float amax = _mm512_reduce_max_ps(amax_v);
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        __m512i total = _mm512_setzero_si512();
        int8_t* pr = out.p.data() + r * k_pad + base;
        for (int c = 0; c < kChunks; ++c) {
          const __m512i pc = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v[c], _mm512_set1_ps(inv)), kRound);
          _mm_storeu_si128((__m128i*)(pr + c * kLanes), _mm512_cvtepi32_epi8(pc));
          total = _mm512_add_epi32(total, pc);
        }
        out.scale[r * out.groups + g] = amax / 127.f;
        out.start[r * out.groups + g] = -128 * _mm512_reduce_add_epi32(total);
      }
    }
  });
  return out;
}

// Float accumulators of `blocks` consecutive 16-output blocks for up to `max_rows` rows. Along
// the way, each group also asks for the same group of `prefetch_blocks` blocks at `prefetch`.
template <int blocks, int max_rows>
inline void tile(const QuantizedRows& xq, int64_t row0, int rows, const uint8_t* w, int64_t block_stride,
                 __m512 (&acc)[max_rows][blocks], const uint8_t* prefetch, int prefetch_blocks) {
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
    for (int j = 0; j < prefetch_blocks; ++j)
      for (int i = 0; i < kStepsPerGroup; ++i)
        _mm_prefetch((const char*)(prefetch + j * block_stride + g * kGroup * kLanes + i * 64), _MM_HINT_T0);
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


struct Problem {
  int64_t rows, n_out, block_stride;
};

// A tile of kBlocks blocks by kRows rows: 2 * kBlocks * kRows accumulators (integer and float),
// kBlocks weight vectors and a broadcast must fit the 32 vector registers.
//
// With more rows than one tile holds, a range of blocks is computed a row tile at a time: the
// first reads its weights from memory, the others find them in cache, and the hardware
// prefetcher, which follows addresses, idles meanwhile. So with `prefetch_next`, the row tiles
// share out between them the request for the next range's weights.
template <int kBlocks, int kRows, class O>
void run_blocks(const Problem& pr, const QuantizedRows& xq, const uint8_t* wp, const float* sp, const float* bp,
                O* yp, int64_t first, int64_t last, bool prefetch_next) {
  __m512 acc[kRows][kBlocks];
  const int64_t tiles = (pr.rows + kRows - 1) / kRows;
  for (int64_t b0 = first; b0 < last; b0 += kBlocks) {
    const int blocks = (int)std::min<int64_t>(kBlocks, last - b0);
    const int64_t next = b0 + kBlocks;
    const int64_t next_blocks = prefetch_next ? std::max<int64_t>(0, std::min<int64_t>(kBlocks, last - next)) : 0;
    for (int64_t m0 = 0, t = 0; m0 < pr.rows; m0 += kRows, ++t) {
      const int tile_rows = (int)std::min<int64_t>(kRows, pr.rows - m0);
      const uint8_t* wt = wp + b0 * pr.block_stride;
      const int64_t pf_first = t * next_blocks / tiles, pf_last = (t + 1) * next_blocks / tiles;
      const uint8_t* pf = pf_last > pf_first ? wp + (next + pf_first) * pr.block_stride : nullptr;
      if (blocks == kBlocks) {
        tile<kBlocks, kRows>(xq, m0, tile_rows, wt, pr.block_stride, acc, pf, (int)(pf_last - pf_first));
      } else {  // the range's last blocks, one at a time
        for (int j = 0; j < blocks; ++j) {
          __m512 one[kRows][1];
          tile<1, kRows>(xq, m0, tile_rows, wt + j * pr.block_stride, pr.block_stride, one, nullptr, 0);
          for (int m = 0; m < tile_rows; ++m) acc[m][j] = one[m][0];
        }
      }
      for (int m = 0; m < tile_rows; ++m)
        for (int j = 0; j < blocks; ++j) {
          const int64_t n0 = (b0 + j) * kLanes;
          // Scale, then bias, each rounded: never fused into one multiply-add.
          __m512 v = _mm512_mul_round_ps(acc[m][j], _mm512_loadu_ps(sp + n0), kRound);
          if (bp) v = _mm512_add_ps(v, _mm512_loadu_ps(bp + n0));
          esp::store16(yp + (m0 + m) * pr.n_out + n0, v, (int)std::min<int64_t>(kLanes, pr.n_out - n0));
        }
    }
  }
}

template <class T, class O>
void w8a8_raw(const T* x, int64_t rows, int64_t k, const uint8_t* packed, int64_t nblocks, int64_t steps,
              int64_t n_out, const float* scales, const float* bias, O* y) {
  const int64_t k_pad = steps * kQuad;
  const QuantizedRows xq = quantize_rows(x, rows, k, k_pad);
  const Problem pr{rows, n_out, steps * kLanes * kQuad};
  // Threads take contiguous ranges of blocks; which thread computes an output never changes its bits.
  at::parallel_for(0, nblocks, 1, [&](int64_t first, int64_t last) {
    // One row: eight weight streams at once. Up to three: four. More: three blocks by four rows,
    // fewer passes over each tile's weights (docs/engine.md has the tile shapes measured).
    if (rows == 1) run_blocks<8, 1, O>(pr, xq, packed, scales, bias, y, first, last, false);
    else if (rows <= 3) run_blocks<4, 3, O>(pr, xq, packed, scales, bias, y, first, last, false);
    else run_blocks<3, 4, O>(pr, xq, packed, scales, bias, y, first, last, true);
  });
}

}  // namespace

void esp::linear_rows_w8a8(const float* x, int64_t rows, int64_t k, const uint8_t* packed, int64_t blocks,
                           int64_t steps, int64_t n_out, const float* scales, const float* bias, float* y) {
  w8a8_raw(x, rows, k, packed, blocks, steps, n_out, scales, bias, y);
}
void esp::linear_rows_w8a8(const at::BFloat16* x, int64_t rows, int64_t k, const uint8_t* packed, int64_t blocks,
                           int64_t steps, int64_t n_out, const float* scales, const float* bias, at::BFloat16* y) {
  w8a8_raw(x, rows, k, packed, blocks, steps, n_out, scales, bias, y);
}
void esp::linear_rows_w8a8(const at::BFloat16* x, int64_t rows, int64_t k, const uint8_t* packed, int64_t blocks,
                           int64_t steps, int64_t n_out, const float* scales, const float* bias, float* y) {
  w8a8_raw(x, rows, k, packed, blocks, steps, n_out, scales, bias, y);
}

#pragma GCC pop_options
#else  // the AVX2 build: W8A8 is not offered (cpu_kernels.supports_w8a8), these are never called
void esp::linear_rows_w8a8(const float*, int64_t, int64_t, const uint8_t*, int64_t, int64_t, int64_t, const float*,
                           const float*, float*) {
  TORCH_CHECK(false, "W8A8 needs AVX512-VNNI");
}
void esp::linear_rows_w8a8(const at::BFloat16*, int64_t, int64_t, const uint8_t*, int64_t, int64_t, int64_t,
                           const float*, const float*, at::BFloat16*) {
  TORCH_CHECK(false, "W8A8 needs AVX512-VNNI");
}
void esp::linear_rows_w8a8(const at::BFloat16*, int64_t, int64_t, const uint8_t*, int64_t, int64_t, int64_t,
                           const float*, const float*, float*) {
  TORCH_CHECK(false, "W8A8 needs AVX512-VNNI");
}
#endif

torch::Tensor pack_w8a8(const torch::Tensor& q) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kChar, "q [N, K] of int8");
  const int64_t n = q.size(0), k = q.size(1);
  const int64_t n_pad = (n + kLanes - 1) / kLanes * kLanes, k_pad = (k + kGroup - 1) / kGroup * kGroup;
  // q + 128 as a byte is q's two's-complement bits with the top one flipped.
  torch::Tensor u = torch::constant_pad_nd(q, {0, k_pad - k, 0, n_pad - n}).view(torch::kByte).bitwise_xor(128);
  return u.view({n_pad / kLanes, kLanes, k_pad / kQuad, kQuad}).permute({0, 2, 1, 3}).contiguous();
}

torch::Tensor linear_w8a8(const torch::Tensor& x_in, const torch::Tensor& packed, int64_t n_out,
                          const c10::optional<torch::Tensor>& bias, bool float_out, const torch::Tensor& scales) {
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == torch::kByte && packed.size(2) == kLanes &&
              packed.size(3) == kQuad && packed.is_contiguous(), "a weight packed by pack_w8a8");
  const int64_t nblocks = packed.size(0), steps = packed.size(1);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) <= steps * kQuad && x_in.size(1) > steps * kQuad - kGroup,
              "x has ", x_in.size(1), " columns; the packed weight takes ", steps * kQuad);
  TORCH_CHECK(n_out <= nblocks * kLanes, "at most ", nblocks * kLanes, " outputs");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.is_contiguous() && scales.numel() == nblocks * kLanes,
              "scales: float32, one per output padded to the blocks");
  const torch::Tensor x = x_in.contiguous();
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, "float32 or bfloat16 activations");
  torch::Tensor b;
  if (bias.has_value()) b = torch::constant_pad_nd(bias->to(torch::kFloat), {0, nblocks * kLanes - n_out}).contiguous();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* sp = scales.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const int64_t rows = x.size(0), k = x.size(1);
  torch::Tensor y = torch::empty({rows, n_out}, float_out ? x.options().dtype(torch::kFloat) : x.options());
  if (dtype == torch::kFloat) {
    esp::linear_rows_w8a8(x.data_ptr<float>(), rows, k, wp, nblocks, steps, n_out, sp, bp, y.data_ptr<float>());
  } else if (float_out) {
    esp::linear_rows_w8a8(x.data_ptr<at::BFloat16>(), rows, k, wp, nblocks, steps, n_out, sp, bp, y.data_ptr<float>());
  } else {
    esp::linear_rows_w8a8(x.data_ptr<at::BFloat16>(), rows, k, wp, nblocks, steps, n_out, sp, bp,
                          y.data_ptr<at::BFloat16>());
  }
  return y;
}
