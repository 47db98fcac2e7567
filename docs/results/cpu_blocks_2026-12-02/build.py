import os, sys
from torch.utils import cpp_extension
os.environ["PATH"] = "/work/main/.venv/bin:" + os.environ["PATH"]
name = sys.argv[1] if len(sys.argv) > 1 else "w8x"
flags = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma",
         "-I/work/main/esp_engine/kernels"]
bd = f"/tmp/w8build/{name}"; os.makedirs(bd, exist_ok=True)
cpp_extension.load(name=name, sources=[f"/work/scratch/s17/{name}.cpp"], extra_cflags=flags,
                   extra_ldflags=["-fopenmp"], build_directory=bd, verbose=False)
print("built", name)
