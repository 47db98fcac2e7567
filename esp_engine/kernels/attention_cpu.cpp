// Attention of query rows over one sequence's cached keys and values, for a CPU with AVX512 or
// AVX2 (vec_cpu.h).
//
// A row's output must have the same bits whether the row is decoded alone or sits in a tree
// block beside siblings it does not see (docs/engine.md, "Row invariance"). Here each (row, head)
// first lists the keys it sees in slot order, and everything after runs over that list in a
// fixed order, in float32: scores, their maximum, exp, the sum, and the weighted sum of values.
// A tree node's list (the context, then its ancestors) is the list the same token has when
// decoded alone, so its output is the same. Nothing depends on the other rows of the call, on
// masked keys, or on the thread that computes it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "ops_cpu.h"
#include "vec_cpu.h"

namespace {

using esp::load16;
using esp::store16;
using esp::vf;

#if ESP_AVX512
// 16 vectors to one: lane j holds the sum of a[j]'s 16 lanes. The same fixed tree of adds for
// each j; which j a key gets is its place in the row's list of keys, the same in any call.
inline vf sum_each(vf (&a)[16]) {
  __m512 b[8], c[4], e[2];
  for (int k = 0; k < 8; ++k)  // 128-bit lane l: (a2k, a2k+1) pairs of the lane's 4 elements, added
    b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  for (int k = 0; k < 4; ++k)  // 128-bit lane l: the lane's sums of a4k .. a4k+3
    c[k] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * k], b[2 * k + 1], 0x44), _mm512_shuffle_ps(b[2 * k], b[2 * k + 1], 0xEE));
  for (int k = 0; k < 2; ++k)  // pairs of 128-bit lanes added
    e[k] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0x88), _mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], 0x88), _mm512_shuffle_f32x4(e[0], e[1], 0xDD));
}

// The dot products of q [dv vectors] with the 16 key rows k[j]: lane j holds q . k[j].
template <int DV, class T>
inline vf dots(const vf* q, const T* const (&k)[16], int64_t dv) {
  vf acc[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) {
    acc[j] = esp::mul(q[0], load16(k[j]));
#pragma GCC unroll 16
    for (int64_t d = 1; d < dv; ++d) acc[j] = esp::fmadd(q[d], load16(k[j] + d * 16), acc[j]);
  }
  return sum_each(acc);
}
#else
// A key's 16-lane products folded to 8 lanes (lanes i and i + 8 added).
template <int DV, class T>
inline __m256 dot8(const vf* q, const T* k, int64_t dv) {
  vf acc = esp::mul(q[0], load16(k));
#pragma GCC unroll 16
  for (int64_t d = 1; d < dv; ++d) acc = esp::fmadd(q[d], load16(k + d * 16), acc);
  return _mm256_add_ps(acc.lo, acc.hi);
}

// Lane j of the result: the sum of the 8 lanes of key k[j0 + j]'s folded products, by the same
// fixed tree of horizontal adds for each j.
template <int DV, class T>
inline __m256 dots8(const vf* q, const T* const* k, int64_t dv) {
  const __m256 g0 = _mm256_hadd_ps(_mm256_hadd_ps(dot8<DV>(q, k[0], dv), dot8<DV>(q, k[1], dv)),
                                   _mm256_hadd_ps(dot8<DV>(q, k[2], dv), dot8<DV>(q, k[3], dv)));
  const __m256 g1 = _mm256_hadd_ps(_mm256_hadd_ps(dot8<DV>(q, k[4], dv), dot8<DV>(q, k[5], dv)),
                                   _mm256_hadd_ps(dot8<DV>(q, k[6], dv), dot8<DV>(q, k[7], dv)));
  // g0's 128-bit halves hold keys 0-3's sums over lanes 0-3 and 4-7; g1's the same for keys 4-7.
  return _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20), _mm256_permute2f128_ps(g0, g1, 0x31));
}

template <int DV, class T>
inline vf dots(const vf* q, const T* const (&k)[16], int64_t dv) {
  return {dots8<DV>(q, k, dv), dots8<DV>(q, k + 8, dv)};
}
#endif

// A head's scores (q . k times scale) for the n keys it sees, 16 at a time (a short last group
// repeats its last key), into sc; returns their lane-wise maximum. DV: the head dimension in
// vectors, fixed at compile time so that q and the sums stay in registers (0: `dvec`, at run time).
template <int DV, class T>
inline vf scores(const T* qrow, const T* khead, int64_t k_slot, const int32_t* seen, int64_t n, vf vscale,
                 float* sc, int64_t dvec) {
  const int64_t dv = DV > 0 ? DV : dvec;
  vf q[DV > 0 ? DV : 16];
  for (int64_t d = 0; d < dv; ++d) q[d] = load16(qrow + d * 16);
  vf vmax = esp::set1(-INFINITY);
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    const T* k[16];
    for (int j = 0; j < 16; ++j) k[j] = khead + (int64_t)seen[std::min<int64_t>(i0 + j, n - 1)] * k_slot;
    const vf s = esp::mul(dots<DV>(q, k, dv), vscale);
    store16(sc + i0, s);
    vmax = esp::max(vmax, s);
  }
  return vmax;
}

// The softmax weights p [heads][n] of `heads` query heads applied to the values they share:
// out[h] = sum over i, in list order, of p[h][i] * v[seen[i]], times inv[h]. Each head's sums
// are those of the head alone; doing several heads at once only reads each value row once and
// gives the multiply-adds independent chains. DV as for `scores`.
template <int H, int DV, class T>
inline void weighted_values(const float* const* p, const float* inv, const int32_t* seen, int64_t n, const T* vhead,
                            int64_t v_slot, T* const* out, int64_t dvec) {
  constexpr int kDV = DV > 0 ? DV : 16;
  const int64_t dv = DV > 0 ? DV : dvec;
  vf acc[H][kDV];
#pragma GCC unroll 16
  for (int h = 0; h < H; ++h)
#pragma GCC unroll 16
    for (int64_t d = 0; d < dv; ++d) acc[h][d] = esp::zero();
  for (int64_t i = 0; i < n; ++i) {
    const T* vrow = vhead + (int64_t)seen[i] * v_slot;
    vf v[kDV];
#pragma GCC unroll 16
    for (int64_t d = 0; d < dv; ++d) v[d] = load16(vrow + d * 16);
#pragma GCC unroll 16
    for (int h = 0; h < H; ++h) {
      const vf w = esp::set1(p[h][i]);
#pragma GCC unroll 16
      for (int64_t d = 0; d < dv; ++d) acc[h][d] = esp::fmadd(w, v[d], acc[h][d]);
    }
  }
#pragma GCC unroll 16
  for (int h = 0; h < H; ++h)
#pragma GCC unroll 16
    for (int64_t d = 0; d < dv; ++d) store16(out[h] + d * 16, esp::mul(acc[h][d], esp::set1(inv[h])));
}

// Heads [0, count) of a group, as many at once as the registers hold (one with a run-time DV, and
// on AVX2, whose 16 registers hold a 64-wide head's sums and values once).
template <int DV, class T>
inline void weighted_values_group(const float* const* p, const float* inv, const int32_t* seen, int64_t n,
                                  const T* vhead, int64_t v_slot, T* const* out, int64_t count, int64_t dvec) {
  constexpr int kMax = DV == 0 || !ESP_AVX512 ? 1 : DV <= 4 ? 4 : 2;
  for (int64_t h0 = 0; h0 < count; h0 += kMax) {
    const auto heads = [&](auto h) { weighted_values<decltype(h)::value, DV>(p + h0, inv + h0, seen, n, vhead, v_slot, out + h0, dvec); };
    switch (std::min<int64_t>(kMax, count - h0)) {
      case 1: heads(std::integral_constant<int, 1>{}); break;
      case 2: if constexpr (kMax >= 2) heads(std::integral_constant<int, 2>{}); break;
      case 3: if constexpr (kMax >= 3) heads(std::integral_constant<int, 3>{}); break;
      default: if constexpr (kMax >= 4) heads(std::integral_constant<int, 4>{}); break;
    }
  }
}

// Tasks are (row, key head): the query heads of a key head's group see the same keys, so they
// share one list of them and one pass over the values. Tasks run key head by key head, so the
// rows a thread takes in turn read the same keys and values, from cache after the first.
template <class T>
void attend_impl(const esp::AttendArgs<T>& a) {
  const int64_t rows = a.rows, heads = a.heads, dim = a.dim;
  const int64_t kv_heads = a.kv_heads, length = a.length;
  const int64_t group = heads / kv_heads, dvec = dim / 16;
  const T* qp = a.q;
  const T* kp = a.keys;
  const T* vp = a.values;
  T* op = a.out;
  const int64_t k_head = a.k_head, k_slot = a.k_slot;
  const int64_t v_head = a.v_head, v_slot = a.v_slot;
  const bool* mp = a.visible;
  const int64_t m_row = a.visible_row;
  const vf vscale = esp::set1(a.scale);
  const int64_t score_stride = length + 16;
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t first, int64_t last) {
    std::vector<int32_t> seen;
    std::vector<float> score(group * score_stride), inv(group);
    std::vector<const float*> weights(group);
    std::vector<T*> outs(group);
    seen.reserve(length);
    int64_t listed_row = -1;
    // One task: each head's scores and softmax weights, then the group's weighted values.
    const auto task_with = [&](auto dv, int64_t r, int64_t kvh, int64_t n) {
      constexpr int DV = decltype(dv)::value;
      const T* khead = kp + kvh * k_head;
      for (int64_t g = 0; g < group; ++g) {
        float* sc = score.data() + g * score_stride;
        const T* qrow = qp + (r * heads + kvh * group + g) * dim;
        const float best = esp::reduce_max(scores<DV>(qrow, khead, k_slot, seen.data(), n, vscale, sc, dvec));
        const vf vbest = esp::set1(best);  // a maximum has no rounding: any order
        vf vsum = esp::zero();
        // sc has room for 16 past n: a short last group is computed whole and its extra lanes zeroed.
        for (int64_t i = 0; i < n; i += 16) {
          const vf e = esp::first(esp::exp(esp::sub(load16(sc + i), vbest)), n - i);
          store16(sc + i, e);
          vsum = esp::add(vsum, e);
        }
        inv[g] = 1.0f / esp::reduce_add(vsum);
        weights[g] = sc;
      }
      weighted_values_group<DV>(weights.data(), inv.data(), seen.data(), n, vp + kvh * v_head, v_slot, outs.data(),
                                group, dvec);
    };
    for (int64_t task = first; task < last; ++task) {
      const int64_t kvh = task / rows, r = task % rows;
      if (r != listed_row) {  // the keys row r sees, in slot order
        seen.clear();
        for (int64_t j = 0; j < length; ++j)
          if (mp == nullptr || mp[r * m_row + j]) seen.push_back((int32_t)j);
        listed_row = r;
      }
      const int64_t n = (int64_t)seen.size();
      for (int64_t g = 0; g < group; ++g) outs[g] = op + (r * heads + kvh * group + g) * dim;
      if (n == 0) {  // sees nothing: zeros (SDPA would give NaN; no pass asks for it)
        for (int64_t g = 0; g < group; ++g)
          for (int64_t d = 0; d < dvec; ++d) store16(outs[g] + d * 16, esp::zero());
        continue;
      }
      if (dvec == 4) task_with(std::integral_constant<int, 4>{}, r, kvh, n);
      else if (dvec == 8) task_with(std::integral_constant<int, 8>{}, r, kvh, n);
      else task_with(std::integral_constant<int, 0>{}, r, kvh, n);
    }
  });
}

}  // namespace

// q [R, H, D]; keys, values [KV, L, D] (the last dim contiguous); visible: bool [R, L] or none
// (every row sees every key). Returns [R, H, D] in q's dtype. D must be a multiple of 16, at most 256.
torch::Tensor attention(const torch::Tensor& q_in, const torch::Tensor& keys, const torch::Tensor& values,
                        const c10::optional<torch::Tensor>& visible, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && keys.dim() == 3 && values.dim() == 3, "q [R, H, D], keys/values [KV, L, D]");
  const torch::Tensor q = q_in.contiguous();
  const int64_t dim = q.size(2);
  TORCH_CHECK(dim % 16 == 0 && dim <= 256, "head dim must be a multiple of 16, at most 256");
  TORCH_CHECK(keys.size(2) == dim && values.sizes() == keys.sizes() && keys.stride(2) == 1 && values.stride(2) == 1);
  TORCH_CHECK(q.size(1) % keys.size(0) == 0, "query heads must be a multiple of key heads");
  TORCH_CHECK(keys.scalar_type() == q.scalar_type() && values.scalar_type() == q.scalar_type());
  if (visible.has_value()) {
    TORCH_CHECK(visible->scalar_type() == torch::kBool && visible->dim() == 2 && visible->size(0) == q.size(0) &&
                visible->size(1) == keys.size(1) && visible->stride(1) == 1, "visible: bool [R, L]");
  }
  torch::Tensor out = torch::empty_like(q);
  const bool* mp = visible.has_value() ? visible->data_ptr<bool>() : nullptr;
  const int64_t m_row = visible.has_value() ? visible->stride(0) : 0;
  if (q.scalar_type() == torch::kBFloat16) {
    using T = at::BFloat16;
    attend_impl<T>({q.data_ptr<T>(), q.size(0), q.size(1), dim, keys.data_ptr<T>(), values.data_ptr<T>(), keys.size(0),
                    keys.size(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1), mp, m_row,
                    (float)scale, out.data_ptr<T>()});
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kFloat, "float32 or bfloat16 only");
    attend_impl<float>({q.data_ptr<float>(), q.size(0), q.size(1), dim, keys.data_ptr<float>(),
                        values.data_ptr<float>(), keys.size(0), keys.size(1), keys.stride(0), keys.stride(1),
                        values.stride(0), values.stride(1), mp, m_row, (float)scale, out.data_ptr<float>()});
  }
  return out;
}

void esp::attend_rows(const AttendArgs<float>& a) { attend_impl<float>(a); }
void esp::attend_rows(const AttendArgs<at::BFloat16>& a) { attend_impl<at::BFloat16>(a); }
