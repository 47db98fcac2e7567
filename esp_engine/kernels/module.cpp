// The Python module of the CPU kernels (esp_engine/cpu_kernels.py).
#include <torch/extension.h>

torch::Tensor pack(const torch::Tensor& w, int64_t per_lane);
torch::Tensor pack_w8a8(const torch::Tensor& q);
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t n_out,
                     const c10::optional<torch::Tensor>& bias, bool float_out,
                     const c10::optional<torch::Tensor>& scales);
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                        const c10::optional<torch::Tensor>& visible, double scale);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
void bind_decoder(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "pack W [N, K] for `linear` (int8: per_lane 1 for float32 x, 2 for bf16 x)",
        pybind11::arg("w"), pybind11::arg("per_lane") = 0);
  m.def("pack_w8a8", &pack_w8a8, "pack int8 q [N, K] for `linear` with int8 activations (AVX512-VNNI)");
  m.def("linear", &linear, "x [M, K] times packed W^T (+ bias), N outputs, in x's dtype or float32",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("n_out"), pybind11::arg("bias"),
        pybind11::arg("float_out") = false, pybind11::arg("scales") = pybind11::none());
  m.def("attention", &attention, "attention of q [R, H, D] over keys/values [KV, L, D] under visible [R, L]");
  m.def("rms_norm", &rms_norm, "x [M, H] normalised by its root mean square, times weight [H]");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of gate_up [M, 2I]");
  bind_decoder(m);
}
