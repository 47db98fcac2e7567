// The Python module of the CPU kernels (esp_engine/cpu_kernels.py).
#include <torch/extension.h>

torch::Tensor pack(const torch::Tensor& w);
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t n_out,
                     const c10::optional<torch::Tensor>& bias);
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                        const c10::optional<torch::Tensor>& visible, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "pack W [N, K] for `linear`");
  m.def("linear", &linear, "x [M, K] times packed W^T (+ bias), N outputs");
  m.def("attention", &attention, "attention of q [R, H, D] over keys/values [KV, L, D] under visible [R, L]");
}
