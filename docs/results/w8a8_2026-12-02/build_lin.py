import sys, os
from torch.utils import cpp_extension
nb = sys.argv[1]
name = f"lin_{nb}"
src = "/tmp/lin_mod.cpp"
open(src, "w").write('''#include <torch/extension.h>
torch::Tensor pack(const torch::Tensor& w, int64_t per_lane);
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t n_out,
  const c10::optional<torch::Tensor>& bias, bool float_out, const c10::optional<torch::Tensor>& scales);
torch::Tensor linear_w8a8(const torch::Tensor& x, const torch::Tensor& packed, int64_t n_out,
  const c10::optional<torch::Tensor>& bias, bool float_out, const torch::Tensor& scales) { TORCH_CHECK(false); }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("pack", &pack); m.def("linear", &linear); }
''')
os.environ["PATH"] = "/work/main/.venv/bin:" + os.environ["PATH"]
flags = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma",
         "-I/work/main/esp_engine/kernels", f"-DONE_ROW_BLOCKS={nb}"]
bd = f"/tmp/w8build/{name}"; os.makedirs(bd, exist_ok=True)
cpp_extension.load(name=name, sources=[src, "" + os.path.join(os.path.dirname(os.path.abspath(__file__)), "linear_exp.cpp") + ""], extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=bd)
print("built", name)
