# python build_lin.py BLOCKS: esp_engine/kernels/linear_cpu.cpp with one-row calls on tiles of BLOCKS blocks
# (the engine's: 8; 4 before this session), built standalone into /tmp/w8build/lin_BLOCKS for bench_lin.py.
import sys, os
here = os.path.dirname(os.path.abspath(__file__))
kernels = os.path.join(here, "..", "..", "..", "esp_engine", "kernels")
s = open(os.path.join(kernels, "linear_cpu.cpp")).read()
s = s.replace("run_blocks<T, O, kOneRowBlocks, 1>", "run_blocks<T, O, ONE_ROW_BLOCKS, 1>")
assert "ONE_ROW_BLOCKS" in s
exp = "/tmp/linear_exp.cpp"
open(exp, "w").write(s)
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
         "-I" + kernels, f"-DONE_ROW_BLOCKS={nb}"]
bd = f"/tmp/w8build/{name}"; os.makedirs(bd, exist_ok=True)
cpp_extension.load(name=name, sources=[src, exp], extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=bd)
print("built", name)
