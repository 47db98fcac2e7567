import os
from torch.utils import cpp_extension
os.environ["PATH"] = "/work/main/.venv/bin:" + os.environ["PATH"]
flags = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-I/work/main/esp_engine/kernels"]
bd = "/tmp/w8build/attn_exp"; os.makedirs(bd, exist_ok=True)
cpp_extension.load(name="attn_exp", sources=["/work/scratch/s17/attn_exp.cpp"], extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=bd)
print("built")
