// y = x W^T + b for a CPU with AVX512 or AVX2 (vec_cpu.h): weights packed once so that the 16
// lanes of a vector are 16 outputs, and every output is one chain of fused multiply-adds over k in
// order. An output's bits therefore depend only on its own row of x and of W, never on how many
// rows the call has or how the work is split between threads: the row invariance that lossless
// speculation needs (esp_engine/row_invariance.py), by construction. Small row counts stream the
// weights once.
//
// Packed layouts (N padded to a multiple of 16 with zero rows):
//   float32:  [N/16][K][16]       lane j of vector k holds w[n0 + j, k]
//   bfloat16: [N/16][K/2][16][2]  lane j of vector p holds (w[n0 + j, 2p], w[n0 + j, 2p + 1]),
//                                 the pairs AVX512-BF16's dot product takes (K padded to even)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "ops_cpu.h"
#include "vec_cpu.h"

namespace {

using esp::vf;

constexpr int kLanes = esp::kVecLanes;
#if ESP_AVX512
// A tile is kTileBlocks 16-output blocks by up to kTileRows rows of x: 24 accumulators, 4 weight vectors
// and a broadcast of x in the 32 vector registers. More rows than kTileRows take more passes over the
// tile's weights, from cache. (Tiles of 2 blocks by 12 rows measured slower in bf16 and no better
// in float32 up to 10 rows: docs/engine.md.)
constexpr int kTileBlocks = 4, kTileRows = 6;
// One row (a decode step's linears): 8 blocks a tile, 8 weight streams in flight instead of 4, which
// measured faster at streaming the weights from memory (docs/benchmarks.md).
constexpr int kOneRowBlocks = 8;
#else
// AVX2 has 16 registers of half the width: a block is two of them, so a tile of one block by six
// rows holds 12 accumulators, the block's two weight vectors and a broadcast.
constexpr int kTileBlocks = 1, kTileRows = 6;
constexpr int kOneRowBlocks = 4;
#endif


// T: x's scalar, the weights' (`weight`), how many k a lane holds, how a weight vector is loaded
// (widened to x's type for int8 weights) and one multiply-add step.
struct F32 {
  using scalar = float;
  using weight = float;
  using wvec = vf;
  static constexpr int kPerLane = 1;
  static inline wvec load(const weight* p) { return esp::load16(p); }
  static inline vf step(vf acc, const scalar* x, int64_t i, wvec w) { return esp::fmadd(esp::set1(x[i]), w, acc); }
};

// int8 weights (w = q * scale, the scale applied to the sums): each weight vector is widened to
// x's type once per step of a tile and used for all its rows. Integers up to 127 are exact in
// float32 and in bf16, so the products are those of the float weights q.
struct I8F32 : F32 {
  using weight = int8_t;
  static inline wvec load(const weight* p) { return esp::widen16(p); }
};

#if defined(__AVX512BF16__)
#define ESP_BF16_LINEAR 1
struct BF16 {
  using scalar = at::BFloat16;
  using weight = at::BFloat16;
  using wvec = __m512i;
  static constexpr int kPerLane = 2;
  static inline wvec load(const weight* p) { return _mm512_loadu_si512((const void*)p); }
  static inline vf step(vf acc, const scalar* x, int64_t i, wvec w) {
    int32_t pair;
    std::memcpy(&pair, x + 2 * i, sizeof(pair));
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(pair), (__m512bh)w);
  }
};

struct I8BF16 : BF16 {
  using weight = int8_t;
  // 16 lanes of (k, k + 1) pairs: 32 bytes widened in order, packed two float32 vectors to one of bf16.
  static inline wvec load(const weight* p) {
    return (__m512i)_mm512_cvtne2ps_pbh(esp::widen16(p + 16), esp::widen16(p));
  }
};
#else
#define ESP_BF16_LINEAR 0  // bf16 linears need AVX512-BF16's dot product
#endif

// An output vector stored in the output's dtype: float32 as it is, bf16 (AVX512-BF16's linears
// only) rounded to nearest even by the instruction those linears have always used.
inline void store_out(float* y, vf v, int valid) { esp::store16(y, v, valid); }
#if ESP_BF16_LINEAR
inline void store_out(at::BFloat16* y, vf v, int valid) {
  __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  _mm256_mask_storeu_epi16((void*)y, valid >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << valid) - 1), h);
}
#endif

// Accumulators of `blocks` consecutive 16-output blocks for up to `max_rows` rows of x.
template <class T, int blocks, int max_rows>
inline void tile(const typename T::scalar* x, int64_t ldx, int rows, const typename T::weight* w,
                 int64_t block_stride, int64_t steps, vf (&acc)[max_rows][blocks]) {
  for (int m = 0; m < max_rows; ++m)
    for (int j = 0; j < blocks; ++j) acc[m][j] = esp::zero();
  const int64_t vector_elems = kLanes * T::kPerLane;
  for (int64_t i = 0; i < steps; ++i) {
    typename T::wvec wv[blocks];
    for (int j = 0; j < blocks; ++j)
      wv[j] = T::load(w + j * block_stride + i * vector_elems);
    for (int m = 0; m < max_rows; ++m) {
      if (m >= rows) break;
      for (int j = 0; j < blocks; ++j) acc[m][j] = T::step(acc[m][j], x + m * ldx, i, wv[j]);
    }
  }
}

struct Problem {
  int64_t rows, n_out, k_pad, steps, block_stride;
};

// The blocks [first, last) of every row, tile by tile, into y of dtype O (x's, or float32); sums
// times the output's scale (int8 weights; else sp is null), plus its bias (or bp null).
template <class T, class O, int kBlocks = kTileBlocks, int kRows = kTileRows>
void run_blocks(const Problem& p, const typename T::scalar* xp, const typename T::weight* wp, O* yp,
                const float* sp, const float* bp, int64_t first, int64_t last) {
  vf acc[kRows][kBlocks];
  for (int64_t b0 = first; b0 < last; b0 += kBlocks) {
    const int blocks = (int)std::min<int64_t>(kBlocks, last - b0);
    for (int64_t m0 = 0; m0 < p.rows; m0 += kRows) {
      const int tile_rows = (int)std::min<int64_t>(kRows, p.rows - m0);
      const auto* xt = xp + m0 * p.k_pad;
      const auto* wt = wp + b0 * p.block_stride;
      if (blocks == kBlocks) {
        tile<T, kBlocks, kRows>(xt, p.k_pad, tile_rows, wt, p.block_stride, p.steps, acc);
      } else {  // the range's last blocks, one at a time
        for (int j = 0; j < blocks; ++j) {
          vf one[kRows][1];
          tile<T, 1, kRows>(xt, p.k_pad, tile_rows, wt + j * p.block_stride, p.block_stride, p.steps, one);
          for (int m = 0; m < tile_rows; ++m) acc[m][j] = one[m][0];
        }
      }
      for (int m = 0; m < tile_rows; ++m)
        for (int j = 0; j < blocks; ++j) {
          const int64_t n0 = (b0 + j) * kLanes;
          vf v = acc[m][j];
          // Never fused into one multiply-add: scale, then bias, each rounded.
          if (sp) v = esp::mul_rounded(v, esp::load16(sp + n0));
          if (bp) v = esp::add(v, esp::load16(bp + n0));
          store_out(yp + (m0 + m) * p.n_out + n0, v, (int)std::min<int64_t>(kLanes, p.n_out - n0));
        }
    }
  }
}

template <class T, class O>
void linear_raw(const typename T::scalar* xp, int64_t rows, const typename T::weight* wp, int64_t nblocks,
                int64_t steps, int64_t n_out, const float* sp, const float* bp, O* yp) {
  const Problem p{rows, n_out, steps * T::kPerLane, steps, steps * kLanes * T::kPerLane};
  // Threads take contiguous ranges of blocks; which thread computes an output never changes its bits.
  at::parallel_for(0, nblocks, 1, [&](int64_t first, int64_t last) {
    if (rows == 1) run_blocks<T, O, kOneRowBlocks, 1>(p, xp, wp, yp, sp, bp, first, last);
    else run_blocks<T, O>(p, xp, wp, yp, sp, bp, first, last);
  });
}

template <class T>
torch::Tensor linear_impl(const torch::Tensor& x_in, const torch::Tensor& packed, int64_t n_out,
                          const c10::optional<torch::Tensor>& bias, bool float_out,
                          const c10::optional<torch::Tensor>& scales) {
  using W = typename T::weight;
  using S = typename T::scalar;
  const int64_t rows = x_in.size(0), k_in = x_in.size(1);
  const int64_t nblocks = packed.size(0), steps = packed.size(1);
  const int64_t k_pad = steps * T::kPerLane;
  torch::Tensor x = x_in.contiguous();
  if (k_pad != k_in) x = torch::constant_pad_nd(x, {0, k_pad - k_in});
  torch::Tensor y = torch::empty({rows, n_out}, float_out ? x.options().dtype(torch::kFloat) : x.options());
  torch::Tensor b;
  if (bias.has_value()) b = torch::constant_pad_nd(bias->to(torch::kFloat), {0, nblocks * kLanes - n_out});
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* sp = scales.has_value() ? scales->data_ptr<float>() : nullptr;
  const S* xp = x.data_ptr<S>();
  const W* wp = packed.data_ptr<W>();
  if (float_out) linear_raw<T, float>(xp, rows, wp, nblocks, steps, n_out, sp, bp, y.data_ptr<float>());
  else linear_raw<T, S>(xp, rows, wp, nblocks, steps, n_out, sp, bp, y.data_ptr<S>());
  return y;
}

}  // namespace

torch::Tensor pack(const torch::Tensor& w, int64_t per_lane) {
  const auto t = w.scalar_type();
  TORCH_CHECK(w.dim() == 2 && (t == torch::kFloat || t == torch::kBFloat16 || t == torch::kChar),
              "W [N, K] of float32, bfloat16 or int8");
  if (per_lane == 0) per_lane = t == torch::kBFloat16 ? 2 : 1;
  TORCH_CHECK(per_lane == 1 || per_lane == 2, "one k per lane (float32 x) or pairs (bf16 x)");
  TORCH_CHECK(t == torch::kChar || per_lane == (t == torch::kBFloat16 ? 2 : 1), "float weights pack for their own dtype");
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t n_pad = (n + kLanes - 1) / kLanes * kLanes, k_pad = (k + per_lane - 1) / per_lane * per_lane;
  torch::Tensor padded = torch::constant_pad_nd(w, {0, k_pad - k, 0, n_pad - n});
  return padded.view({n_pad / kLanes, kLanes, k_pad / per_lane, per_lane}).permute({0, 2, 1, 3}).contiguous();
}

torch::Tensor linear_w8a8(const torch::Tensor& x, const torch::Tensor& packed, int64_t n_out,
                          const c10::optional<torch::Tensor>& bias, bool float_out, const torch::Tensor& scales);

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t n_out,
                     const c10::optional<torch::Tensor>& bias, bool float_out,
                     const c10::optional<torch::Tensor>& scales) {
  if (packed.scalar_type() == torch::kByte) {  // pack_w8a8's: int8 activations too (w8a8_cpu.cpp)
    TORCH_CHECK(scales.has_value(), "W8A8 weights take their scales");
    return linear_w8a8(x, packed, n_out, bias, float_out, *scales);
  }
  const bool int8 = packed.scalar_type() == torch::kChar;
  TORCH_CHECK(x.dim() == 2 && (int8 || x.scalar_type() == packed.scalar_type()), "x [M, K] of the weights' dtype");
  const int64_t k_pad = packed.size(1) * packed.size(3);
  TORCH_CHECK(packed.dim() == 4 && k_pad >= x.size(1) && k_pad - x.size(1) < packed.size(3),
              "x has ", x.size(1), " columns; the packed weight takes ", k_pad);
  TORCH_CHECK(int8 == scales.has_value(), "int8 weights take their scales, and only they");
  if (int8) {
    TORCH_CHECK(scales->scalar_type() == torch::kFloat && scales->is_contiguous() &&
                scales->numel() == packed.size(0) * kLanes, "scales: float32, one per output padded to the blocks");
    TORCH_CHECK(packed.size(3) == (x.scalar_type() == torch::kBFloat16 ? 2 : 1), "int8 weights packed for x's dtype");
  }
  if (x.scalar_type() == torch::kBFloat16) {
#if ESP_BF16_LINEAR
    return int8 ? linear_impl<I8BF16>(x, packed, n_out, bias, float_out, scales)
                : linear_impl<BF16>(x, packed, n_out, bias, float_out, scales);
#else
    TORCH_CHECK(false, "bf16 linears need AVX512-BF16; this build has none");
#endif
  }
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "float32 or bfloat16 only");
  return int8 ? linear_impl<I8F32>(x, packed, n_out, bias, float_out, scales)
              : linear_impl<F32>(x, packed, n_out, bias, float_out, scales);
}

void esp::linear_rows(const float* x, int64_t rows, const float* packed, int64_t blocks, int64_t steps, int64_t n_out,
                      const float* bias, float* y) {
  linear_raw<F32, float>(x, rows, packed, blocks, steps, n_out, nullptr, bias, y);
}

void esp::linear_rows(const at::BFloat16* x, int64_t rows, const at::BFloat16* packed, int64_t blocks, int64_t steps,
                      int64_t n_out, const float* bias, at::BFloat16* y) {
#if ESP_BF16_LINEAR
  linear_raw<BF16, at::BFloat16>(x, rows, packed, blocks, steps, n_out, nullptr, bias, y);
#else
  TORCH_CHECK(false, "bf16 linears need AVX512-BF16; this build has none");
#endif
}

void esp::linear_rows(const float* x, int64_t rows, const int8_t* packed, int64_t blocks, int64_t steps, int64_t n_out,
                      const float* scales, const float* bias, float* y) {
  linear_raw<I8F32, float>(x, rows, packed, blocks, steps, n_out, scales, bias, y);
}

void esp::linear_rows(const at::BFloat16* x, int64_t rows, const int8_t* packed, int64_t blocks, int64_t steps,
                      int64_t n_out, const float* scales, const float* bias, at::BFloat16* y) {
#if ESP_BF16_LINEAR
  linear_raw<I8BF16, at::BFloat16>(x, rows, packed, blocks, steps, n_out, scales, bias, y);
#else
  TORCH_CHECK(false, "bf16 linears need AVX512-BF16; this build has none");
#endif
}
