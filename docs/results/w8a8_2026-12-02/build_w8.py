# standalone build of the w8a8 kernel for tile experiments: python build_w8.py FB FR MB MR
import sys, os, torch
from torch.utils import cpp_extension
fb, fr, mb, mr = sys.argv[1:5]; grp = sys.argv[5] if len(sys.argv) > 5 else "32"
name = f"w8x_{fb}_{fr}_{mb}_{mr}_g{grp}"
src = "/tmp/w8_mod.cpp"
open(src, "w").write('''#include <torch/extension.h>
torch::Tensor pack_w8a8(const torch::Tensor& q);
torch::Tensor linear_w8a8(const torch::Tensor& x, const torch::Tensor& packed, int64_t n_out,
  const c10::optional<torch::Tensor>& bias, bool float_out, const torch::Tensor& scales);
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("pack", &pack_w8a8); m.def("linear", &linear_w8a8); }
''')
os.environ["PATH"] = "/work/main/.venv/bin:" + os.environ["PATH"]
flags = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma",
         "-I/work/main/esp_engine/kernels", f"-DW8A8_FEW_BLOCKS={fb}", f"-DW8A8_FEW_ROWS={fr}",
         f"-DW8A8_MANY_BLOCKS={mb}", f"-DW8A8_MANY_ROWS={mr}", f"-DESP_W8A8_GROUP={grp}"]
bd = f"/tmp/w8build/{name}"; os.makedirs(bd, exist_ok=True)
m = cpp_extension.load(name=name, sources=[src, "/work/main/esp_engine/kernels/w8a8_cpu.cpp"], extra_cflags=flags,
                       extra_ldflags=["-fopenmp"], build_directory=bd, verbose=False)
print("built", name)
