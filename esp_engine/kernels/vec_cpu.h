// The vector of 16 float32 lanes the CPU kernels compute in, for the two instruction sets they
// are built for: AVX512 (one __m512) and AVX2 with FMA (two __m256, lanes 0-7 and 8-15). Every
// operation here is lane by lane the same function of its inputs on both, so where a value sits
// in a vector never changes its result, and a kernel written once runs on either.
//
// The AVX2 build is compiled with -ffp-contract=off: a multiply and an add stay two roundings,
// as torch's separate ops make them (AVX512 uses the explicit rounding forms for that).
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>

namespace esp {

#if defined(__AVX512F__)
#define ESP_AVX512 1
using vf = __m512;
#else
#define ESP_AVX512 0
struct vf {
  __m256 lo, hi;
};
#endif

constexpr int kVecLanes = 16;

#if ESP_AVX512

inline vf zero() { return _mm512_setzero_ps(); }
inline vf set1(float a) { return _mm512_set1_ps(a); }
inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf div(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf max(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf min(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf abs(vf a) { return _mm512_abs_ps(a); }
inline vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }   // a b + c, one rounding
inline vf fnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); } // c - a b, one rounding
// A product and a sum each rounded, never fused with what follows or precedes them.
inline vf mul_rounded(vf a, vf b) { return _mm512_mul_round_ps(a, b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf add_rounded(vf a, vf b) { return _mm512_add_round_ps(a, b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline float reduce_add(vf a) { return _mm512_reduce_add_ps(a); }
inline float reduce_max(vf a) { return _mm512_reduce_max_ps(a); }
// The first n lanes of a, the others zero.
inline vf first(vf a, int64_t n) {
  return n >= 16 ? a : _mm512_maskz_mov_ps((__mmask16)((1u << n) - 1), a);
}

inline vf load16(const float* p) { return _mm512_loadu_ps(p); }
inline vf load16(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256((const __m256i*)p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// 16 int8 as float32 (exact).
inline vf widen16(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
inline void store16(float* p, vf v) { _mm512_storeu_ps(p, v); }

// 16 lanes rounded to bf16 to nearest even, as torch's float -> bfloat16 conversion does (NaN
// stays NaN), as 16 u16.
inline __m256i to_bf16(vf v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}
// 16 bf16 (u16) as float32 (exact).
inline vf from_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

// 2^n x for integral n in [-126, 127], exact wherever the result is a normal float or zero.
inline vf scale_by_pow2(vf x, vf n) { return _mm512_scalef_ps(x, n); }
inline vf round_nearest(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

#else  // AVX2 + FMA: two halves, each op applied to both in the same way

inline vf zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline vf set1(float a) { const __m256 v = _mm256_set1_ps(a); return {v, v}; }
inline vf add(vf a, vf b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline vf sub(vf a, vf b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline vf mul(vf a, vf b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline vf div(vf a, vf b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline vf max(vf a, vf b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline vf min(vf a, vf b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline vf abs(vf a) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  return {_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m)};
}
inline vf fmadd(vf a, vf b, vf c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline vf fnmadd(vf a, vf b, vf c) { return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
inline vf mul_rounded(vf a, vf b) { return mul(a, b); }  // -ffp-contract=off keeps it a rounding
inline vf add_rounded(vf a, vf b) { return add(a, b); }
// The same tree of adds as AVX512's reduction: lanes i and i + 8, then + 4, + 2, + 1.
inline float reduce_add(vf a) {
  const __m256 s8 = _mm256_add_ps(a.lo, a.hi);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
inline float reduce_max(vf a) {
  const __m256 s8 = _mm256_max_ps(a.lo, a.hi);
  const __m128 s4 = _mm_max_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_max_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_max_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
inline __m256 first8(int64_t n) {  // lanes [0, n) all ones, n in [0, 8]
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), idx));
}
inline vf first(vf a, int64_t n) {
  if (n >= 16) return a;
  return {_mm256_and_ps(a.lo, first8(std::min<int64_t>(n, 8))), _mm256_and_ps(a.hi, first8(std::max<int64_t>(n - 8, 0)))};
}

inline vf load16(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline vf from_bf16(__m256i h) {
  const __m256i lo = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(h));
  const __m256i hi = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16))};
}
inline vf load16(const at::BFloat16* p) { return from_bf16(_mm256_loadu_si256((const __m256i*)p)); }
inline vf widen16(const int8_t* p) {
  const __m128i b = _mm_loadu_si128((const __m128i*)p);
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))};
}
inline void store16(float* p, vf v) { _mm256_storeu_ps(p, v.lo); _mm256_storeu_ps(p + 8, v.hi); }

inline __m256i bf16_bits8(__m256 v) {  // 8 lanes rounded to bf16, in the low 16 bits of each int32
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x400000));
  return _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet, nan), 16);
}
inline __m256i to_bf16(vf v) {
  // packus works within 128-bit lanes: (lo0-3, hi0-3, lo4-7, hi4-7), put back in order.
  const __m256i packed = _mm256_packus_epi32(bf16_bits8(v.lo), bf16_bits8(v.hi));
  return _mm256_permute4x64_epi64(packed, 0xD8);
}

inline vf round_nearest(vf x) {
  return {_mm256_round_ps(x.lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
          _mm256_round_ps(x.hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline __m256 pow2_8(__m256 n) {  // 2^n for integral n in [-126, 127]: the exponent field n + 127
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline vf scale_by_pow2(vf x, vf n) { return {_mm256_mul_ps(x.lo, pow2_8(n.lo)), _mm256_mul_ps(x.hi, pow2_8(n.hi))}; }

#endif

inline void store16(at::BFloat16* p, vf v) { _mm256_storeu_si256((__m256i*)p, to_bf16(v)); }

// The first min(remaining, 16) lanes from p; the others are zero.
template <class T>
inline vf load16(const T* p, int64_t remaining) {
  if (remaining >= 16) return load16(p);
  T buf[16] = {};
  if (remaining > 0) std::memcpy(buf, p, remaining * sizeof(T));
  return load16(buf);
}
// The first min(remaining, 16) lanes to p.
template <class T>
inline void store16(T* p, vf v, int64_t remaining) {
  if (remaining >= 16) return store16(p, v);
  T buf[16];
  store16(buf, v);
  if (remaining > 0) std::memcpy(p, buf, remaining * sizeof(T));
}

// exp(x) = 2^n p(r), x = n ln2 + r, |r| <= ln2 / 2 (Cephes' expf polynomial); x clamped to
// [-87.3, 88.3], where float32 neither underflows to denormals nor overflows.
inline vf exp(vf x) {
  x = min(max(x, set1(-87.3f)), set1(88.3f));
  const vf n = round_nearest(mul(x, set1(1.44269504088896341f)));
  vf r = fnmadd(n, set1(0.693359375f), x);
  r = fnmadd(n, set1(-2.12194440e-4f), r);
  vf p = set1(1.9875691500e-4f);
  p = fmadd(p, r, set1(1.3981999507e-3f));
  p = fmadd(p, r, set1(8.3334519073e-3f));
  p = fmadd(p, r, set1(4.1665795894e-2f));
  p = fmadd(p, r, set1(1.6666665459e-1f));
  p = fmadd(p, r, set1(5.0000001201e-1f));
  p = fmadd(p, mul(r, r), add(r, set1(1.0f)));
  return scale_by_pow2(p, n);
}

}  // namespace esp
