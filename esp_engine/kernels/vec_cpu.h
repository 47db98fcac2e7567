// AVX512 helpers the CPU kernels share: 16 float32 lanes loaded from and stored to float32 or
// bfloat16, and exp. Lane by lane each is the same function of its input, so where a value sits
// in a vector never changes its result.
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

namespace esp {

inline __mmask16 first_lanes(int64_t remaining) {
  return remaining >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << remaining) - 1);
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256((const __m256i*)p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// The first min(remaining, 16) lanes; the others are zero.
inline __m512 load16(const float* p, int64_t remaining) { return _mm512_maskz_loadu_ps(first_lanes(remaining), p); }
inline __m512 load16(const at::BFloat16* p, int64_t remaining) {
  const __m256i h = _mm256_maskz_loadu_epi16(first_lanes(remaining), (const void*)p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m256i to_bf16(__m512 v) {
  // Round to nearest even, as torch's float -> bfloat16 conversion does (NaN stays NaN).
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, to_bf16(v)); }
inline void store16(float* p, __m512 v, int64_t remaining) { _mm512_mask_storeu_ps(p, first_lanes(remaining), v); }
inline void store16(at::BFloat16* p, __m512 v, int64_t remaining) {
  _mm256_mask_storeu_epi16((void*)p, first_lanes(remaining), to_bf16(v));
}

// exp(x) = 2^n p(r), x = n ln2 + r, |r| <= ln2 / 2 (Cephes' expf polynomial); x clamped to
// [-87.3, 88.3], where float32 neither underflows to denormals nor overflows.
inline __m512 exp(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

}  // namespace esp
