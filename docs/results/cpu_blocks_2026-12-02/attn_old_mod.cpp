#include <torch/extension.h>
torch::Tensor attention(const torch::Tensor& q_in, const torch::Tensor& keys, const torch::Tensor& values,
                        const c10::optional<torch::Tensor>& visible, double scale);
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("attention", &attention); }
