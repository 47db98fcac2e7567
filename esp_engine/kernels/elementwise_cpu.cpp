// RMSNorm and SiLU-times-up for a CPU with AVX512 or AVX2 (vec_cpu.h): one call each instead of torch's several ops
// per layer, which at one to a few rows cost more in dispatch than in arithmetic. Both compute a
// row from that row alone in a fixed order, so a row's bits never depend on its call.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>

#include "ops_cpu.h"
#include "vec_cpu.h"

namespace {

template <class T>
void rms_norm_impl(const T* xp, const T* wp, int64_t rows, int64_t dim, float eps, T* yp) {
  at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const T* xr = xp + r * dim;
      esp::vf acc = esp::zero();
      for (int64_t d = 0; d < dim; d += 16) {
        const esp::vf v = esp::load16(xr + d, dim - d);
        acc = esp::fmadd(v, v, acc);
      }
      const float inv = 1.0f / std::sqrt(esp::reduce_add(acc) / (float)dim + eps);
      const esp::vf vinv = esp::set1(inv);
      for (int64_t d = 0; d < dim; d += 16)
        esp::store16(yp + r * dim + d, esp::mul(esp::mul(esp::load16(xr + d, dim - d), vinv),
                                                esp::load16(wp + d, dim - d)), dim - d);
    }
  });
}

template <class T>
void silu_mul_impl(const T* gp, int64_t stride, int64_t rows, int64_t width, T* yp) {
  at::parallel_for(0, rows, 4, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const T* g = gp + r * stride;
      for (int64_t d = 0; d < width; d += 16) {
        const esp::vf a = esp::load16(g + d, width - d), b = esp::load16(g + width + d, width - d);
        // silu(a) = a / (1 + exp(-a))
        const esp::vf e = esp::exp(esp::sub(esp::zero(), a));
        const esp::vf s = esp::div(a, esp::add(esp::set1(1.0f), e));
        esp::store16(yp + r * width + d, esp::mul(s, b), width - d);
      }
    }
  });
}

}  // namespace

// x [M, H] times rsqrt(mean(x^2) + eps) times weight [H], in x's dtype (float32 inside).
torch::Tensor rms_norm(const torch::Tensor& x_in, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x_in.dim() == 2 && weight.dim() == 1 && weight.size(0) == x_in.size(1), "x [M, H], weight [H]");
  TORCH_CHECK(weight.scalar_type() == x_in.scalar_type(), "x and weight of one dtype");
  const torch::Tensor x = x_in.contiguous(), w = weight.contiguous();
  torch::Tensor y = torch::empty_like(x);
  if (x.scalar_type() == torch::kBFloat16) {
    using T = at::BFloat16;
    esp::rms_norm_rows(x.data_ptr<T>(), w.data_ptr<T>(), x.size(0), x.size(1), (float)eps, y.data_ptr<T>());
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat, "float32 or bfloat16 only");
    esp::rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), x.size(0), x.size(1), (float)eps, y.data_ptr<float>());
  }
  return y;
}

// gate_up [M, 2I] (gate, then up) -> silu(gate) * up [M, I].
torch::Tensor silu_mul(const torch::Tensor& gate_up_in) {
  TORCH_CHECK(gate_up_in.dim() == 2 && gate_up_in.size(1) % 2 == 0, "gate_up [M, 2I]");
  const torch::Tensor gate_up = gate_up_in.stride(1) == 1 ? gate_up_in : gate_up_in.contiguous();
  torch::Tensor y = torch::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  const int64_t stride = gate_up.stride(0), rows = y.size(0), width = y.size(1);
  if (gate_up.scalar_type() == torch::kBFloat16) {
    using T = at::BFloat16;
    esp::silu_mul_rows(gate_up.data_ptr<T>(), stride, rows, width, y.data_ptr<T>());
  } else {
    TORCH_CHECK(gate_up.scalar_type() == torch::kFloat, "float32 or bfloat16 only");
    esp::silu_mul_rows(gate_up.data_ptr<float>(), stride, rows, width, y.data_ptr<float>());
  }
  return y;
}

void esp::rms_norm_rows(const float* x, const float* w, int64_t rows, int64_t dim, float eps, float* y) {
  rms_norm_impl<float>(x, w, rows, dim, eps, y);
}
void esp::rms_norm_rows(const at::BFloat16* x, const at::BFloat16* w, int64_t rows, int64_t dim, float eps,
                        at::BFloat16* y) {
  rms_norm_impl<at::BFloat16>(x, w, rows, dim, eps, y);
}
void esp::silu_mul_rows(const float* gate_up, int64_t stride, int64_t rows, int64_t width, float* y) {
  silu_mul_impl<float>(gate_up, stride, rows, width, y);
}
void esp::silu_mul_rows(const at::BFloat16* gate_up, int64_t stride, int64_t rows, int64_t width, at::BFloat16* y) {
  silu_mul_impl<at::BFloat16>(gate_up, stride, rows, width, y);
}
