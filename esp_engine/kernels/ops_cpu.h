// The kernels' raw entry points, for callers in C++ (decoder_cpu.cpp) that run many of them per
// call: pointers in, no tensors made, the same arithmetic as their Python-facing wrappers.
#pragma once

#include <torch/extension.h>

namespace esp {

// y [rows, n_out] = x [rows, k_pad] W^T (+ bias, float32 padded to the packed width, or null),
// W packed by `pack` into `blocks` x `steps` vectors.
void linear_rows(const float* x, int64_t rows, const float* packed, int64_t blocks, int64_t steps, int64_t n_out,
                 const float* bias, float* y);
void linear_rows(const at::BFloat16* x, int64_t rows, const at::BFloat16* packed, int64_t blocks, int64_t steps,
                 int64_t n_out, const float* bias, at::BFloat16* y);
// The same with int8 weights, each output's sum times its float32 scale (padded like the bias).
void linear_rows(const float* x, int64_t rows, const int8_t* packed, int64_t blocks, int64_t steps, int64_t n_out,
                 const float* scales, const float* bias, float* y);
void linear_rows(const at::BFloat16* x, int64_t rows, const int8_t* packed, int64_t blocks, int64_t steps,
                 int64_t n_out, const float* scales, const float* bias, at::BFloat16* y);

// W8A8 (w8a8_cpu.cpp, AVX512-VNNI): x [rows, k] quantized to int8 per row and group of
// kW8A8Group, times u8 weights packed by pack_w8a8 (`blocks` x `steps` vectors of 4 k), each
// output times its float32 scale (padded like the bias); y in x's dtype or float32.
constexpr int kW8A8Group = 32;
void linear_rows_w8a8(const float* x, int64_t rows, int64_t k, const uint8_t* packed, int64_t blocks, int64_t steps,
                      int64_t n_out, const float* scales, const float* bias, float* y);
void linear_rows_w8a8(const at::BFloat16* x, int64_t rows, int64_t k, const uint8_t* packed, int64_t blocks,
                      int64_t steps, int64_t n_out, const float* scales, const float* bias, at::BFloat16* y);
void linear_rows_w8a8(const at::BFloat16* x, int64_t rows, int64_t k, const uint8_t* packed, int64_t blocks,
                      int64_t steps, int64_t n_out, const float* scales, const float* bias, float* y);

// y [rows, dim] = x [rows, dim] / rms(x) * w.
void rms_norm_rows(const float* x, const float* w, int64_t rows, int64_t dim, float eps, float* y);
void rms_norm_rows(const at::BFloat16* x, const at::BFloat16* w, int64_t rows, int64_t dim, float eps,
                   at::BFloat16* y);

// y [rows, width] = silu(gate) * up, gate_up rows [gate | up] of `stride` elements apart.
void silu_mul_rows(const float* gate_up, int64_t stride, int64_t rows, int64_t width, float* y);
void silu_mul_rows(const at::BFloat16* gate_up, int64_t stride, int64_t rows, int64_t width, at::BFloat16* y);

// Attention of `rows` query rows [rows, heads, dim] over keys/values [kv_heads, length, dim]
// (given by their head and slot strides), row r seeing slot j where visible[r * visible_row + j]
// (visible null: every slot); out [rows, heads, dim].
template <class T>
struct AttendArgs {
  const T* q;
  int64_t rows, heads, dim;
  const T* keys;
  const T* values;
  int64_t kv_heads, length, k_head, k_slot, v_head, v_slot;
  const bool* visible;
  int64_t visible_row;
  float scale;
  T* out;
};
void attend_rows(const AttendArgs<float>& a);
void attend_rows(const AttendArgs<at::BFloat16>& a);

}  // namespace esp
