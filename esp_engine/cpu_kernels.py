"""Our CPU kernels (`kernels/*.cpp`), compiled for this machine on first use.

- `linear` (`kernels/linear_cpu.cpp`): a decode step on a CPU streams every weight once, so its
  speed is how close the linears come to memory bandwidth. oneDNN's packed kernels stay short of
  it at the one to few rows of decode and verify passes; this kernel packs W so that a vector's
  lanes are 16 outputs and streams it once for up to six rows of x. W is float32, bf16, or int8
  with a scale per output (`quantization.Int8Linear`), widened in registers. With AVX512-VNNI
  it also takes W8A8 (`kernels/w8a8_cpu.cpp`, `quantization.W8A8Linear`): those int8 weights
  times activations quantized to int8 per row and group of `W8A8_GROUP`, in integer dot products
  of twice bf16's rate.
- `attention` (`kernels/attention_cpu.cpp`): each row's attention over the keys it sees, listed
  in slot order, in float32 and a fixed order.
- `rms_norm` and `silu_mul` (`kernels/elementwise_cpu.cpp`): one call where torch takes several ops.
- `CpuDecoder` (`kernels/decoder_cpu.cpp`): all layers of a pass in one call, running the kernels
  above and doing RoPE, the key/value stores and the residual adds with the roundings of torch's
  ops, so its results have the bits of the op-by-op pass without its hundreds of op dispatches
  (`model.LlamaFamilyModel.cpu_decoder`).

Each output is computed the same way whatever the rows beside it, so speculation's row
invariance holds by construction (docs/engine.md, "The CPU kernels", has the measurements).

They are built for AVX512 (F, BW, VL, DQ; AVX512-BF16 for bf16 weights in `linear`, VNNI for
W8A8) or, on CPUs without it, for AVX2 with FMA (float32 and int8 weights in `linear`; no W8A8),
from the same sources (`kernels/vec_cpu.h`), with a C++ compiler and ninja. They are compiled once
per machine and torch version into the esp-serve cache (a minute or two); where any of that is
missing, or `ESP_SERVE_CPU_KERNEL=0`, `model.PackedLinear` keeps oneDNN,
`attention.InvariantAttention` and the model's norms and SiLU their torch ops, and the log says
why. `ESP_SERVE_CPU_KERNEL=avx2` builds the AVX2 kernels on an AVX512 CPU too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from .cache_dir import cache_root
from .cpu_info import cpu_info

log = logging.getLogger(__name__)

_KERNELS = Path(__file__).with_name("kernels")
SOURCES = [_KERNELS / name for name in ("linear_cpu.cpp", "w8a8_cpu.cpp", "attention_cpu.cpp",
                                          "elementwise_cpu.cpp", "decoder_cpu.cpp", "module.cpp")]
HEADERS = [_KERNELS / name for name in ("vec_cpu.h", "ops_cpu.h")]
ENV_SWITCH = "ESP_SERVE_CPU_KERNEL"
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
_AVX2 = ("avx2", "fma", "f16c")
# -fopenmp: at::parallel_for is inlined from ATen's headers as an OpenMP loop; without the flag
# the pragma is dropped and the kernel runs on one thread.
_FLAGS_AVX512 = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]
# -ffp-contract=off: AVX2 has no explicit rounding forms, so a multiply followed by an add must not
# be fused by the compiler (vec_cpu.h's mul_rounded and add_rounded).
_FLAGS_AVX2 = ["-O3", "-fopenmp", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off"]


@dataclass(frozen=True, slots=True)
class KernelStatus:
    module: ModuleType | None
    dtypes: frozenset[torch.dtype]  # weight dtypes `linear` runs on this CPU (attention: float32, bf16)
    reason: str  # why it is (not) used, for the log
    w8a8: bool = False  # whether `linear` takes W8A8 weights here (AVX512-VNNI)
    isa: str = ""  # the instruction set they were built for: "avx512", "avx2" ("" where not built)


_DTYPES = (torch.float32, torch.bfloat16)  # what every kernel takes, where it runs at all
W8A8_GROUP = 32  # activations per int8 scale in W8A8 (kW8A8Group in kernels/ops_cpu.h)
_FALLBACK = "oneDNN linears, torch ops for the rest"
_lock = threading.Lock()
_status: KernelStatus | None = None


def status() -> KernelStatus:
    """The kernels for this process, compiled or loaded from the cache at the first call."""
    global _status
    if _status is None:
        with _lock:
            if _status is None:
                _status = _load()
                log.info("CPU kernels: %s", _status.reason)
    return _status


def supports_linear(dtype: torch.dtype) -> bool:
    """Whether `pack` and `linear` take weights of `dtype` here (compiling the kernels if need be)."""
    return dtype in _DTYPES and dtype in status().dtypes


def supports_w8a8(dtype: torch.dtype) -> bool:
    """Whether `linear` takes W8A8 weights (`pack_w8a8`) with activations of `dtype` here."""
    return dtype in _DTYPES and status().w8a8


def supports_attention(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `attention` takes this dtype and head size here."""
    return dtype in _DTYPES and head_dim % 16 == 0 and head_dim <= 256 and status().module is not None


def pack(weight: torch.Tensor, activations: torch.dtype | None = None) -> torch.Tensor:
    """W [N, K] in the kernel's layout (a new tensor; W is not kept). int8 weights are packed for
    the `activations` dtype they will multiply (float weights: their own)."""
    per_lane = 0 if activations is None else (2 if activations == torch.bfloat16 else 1)
    return status().module.pack(weight.contiguous(), per_lane)


def unpack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The weight [out_features, in_features] that `pack` or `pack_w8a8` made `packed` of (a new
    tensor): float weights as they were, int8 and W8A8 ones as q."""
    blocks, steps, lanes, per_lane = packed.shape
    return _signed(packed.permute(0, 2, 1, 3).reshape(blocks * lanes, steps * per_lane)[:out_features, :in_features]
                   .contiguous())


def unpack_rows(packed: torch.Tensor, index: torch.Tensor, in_features: int) -> torch.Tensor:
    """Rows `index` of the weight that `pack` or `pack_w8a8` made `packed` of, [len(index), in_features]."""
    _, steps, lanes, per_lane = packed.shape
    return _signed(packed[index // lanes, :, index % lanes, :].reshape(len(index), steps * per_lane)[:, :in_features])


def _signed(weight: torch.Tensor) -> torch.Tensor:
    # pack_w8a8 stores q + 128 as bytes: q's bits with the top one flipped.
    return (weight ^ 128).view(torch.int8) if weight.dtype == torch.uint8 else weight


def pack_w8a8(q: torch.Tensor) -> torch.Tensor:
    """int8 q [N, K] (w = q * scale per output) as u8 q + 128 in VNNI's layout, K padded to
    `W8A8_GROUP`, for `linear` with int8 activations."""
    return status().module.pack_w8a8(q.contiguous())


def pad_scales(scales: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Per-output scales of int8 weights as `linear` takes them: float32, padded to the blocks."""
    return torch.nn.functional.pad(scales.float(), (0, packed.shape[0] * 16 - scales.numel())).contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None,
           float_out: bool = False, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] W^T + bias, [M, out_features], in x's dtype (W's), or with `float_out` the float32
    sums before that rounding. int8 weights (W = q * scale per output, packed by `pack` or
    `pack_w8a8`) take `scales` (`pad_scales`)."""
    return status().module.linear(x, packed, out_features, bias, float_out, scales)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """Output [M, heads, D] of queries [M, heads, D] over keys and values [kv_heads, L, D], row m
    seeing the keys where `visible` [M, L] is True (None: all)."""
    return status().module.attention(q, keys, values, visible, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [M, H] / sqrt(mean(x^2) + eps) * weight, computed in float32, in x's dtype."""
    return status().module.rms_norm(x, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [M, 2I] = [gate | up]: [M, I]."""
    return status().module.silu_mul(gate_up)


def supports_elementwise(dtype: torch.dtype) -> bool:
    """Whether `rms_norm` and `silu_mul` take this dtype here."""
    return dtype in _DTYPES and status().module is not None


def _load() -> KernelStatus:
    switch = os.environ.get(ENV_SWITCH, "1").strip().lower()
    if switch in ("0", "false", "no", "off"):
        return KernelStatus(None, frozenset(), f"off ({ENV_SWITCH}=0): {_FALLBACK}")
    flags = set(cpu_info().flags)
    missing = [f for f in _AVX512 if f not in flags]
    if not missing and switch != "avx2":
        isa, cflags = "avx512", _FLAGS_AVX512
        # bf16 linears need AVX512-BF16's dot product; and where AMX tiles compute bf16 matmuls,
        # oneDNN's AMX path keeps blocks of rows nearly as cheap as one row, which speculation needs
        # more than one row's speed, so bf16 linears stay on oneDNN there.
        dtypes = {torch.float32}
        if "avx512_bf16" in flags and "amx_bf16" not in flags:
            dtypes.add(torch.bfloat16)
        bf16_note = "" if torch.bfloat16 in dtypes else (
            "; bf16 linears on oneDNN (AMX)" if "amx_bf16" in flags else "; bf16 linears on oneDNN (no avx512_bf16)")
        w8a8 = "avx512_vnni" in flags
        w8a8_note = f"W8A8 {'with' if w8a8 else 'not available: no'} AVX512-VNNI"
    else:
        missing_avx2 = [f for f in _AVX2 if f not in flags]
        if missing_avx2:
            return KernelStatus(None, frozenset(), f"the CPU lacks {', '.join(missing + missing_avx2)}: {_FALLBACK}")
        isa, cflags, dtypes, w8a8 = "avx2", _FLAGS_AVX2, {torch.float32}, False
        bf16_note = "; bf16 linears on oneDNN (AVX2 build)"
        w8a8_note = "W8A8 not available (AVX2 build: no VNNI)"
    path = os.environ.get("PATH", "")
    try:
        from torch.utils import cpp_extension

        # torch runs `ninja` from PATH; the ninja wheel (a dependency) puts it beside the venv's
        # python, which is not on PATH unless the venv is activated.
        ninja_dir = _ninja_dir()
        os.environ["PATH"] = os.pathsep.join([ninja_dir, path]) if ninja_dir else path
        # One directory per source and flags: a rebuild never overwrites a library that another
        # process (an older server sharing the cache) has loaded.
        digest = hashlib.sha256(" ".join(cflags).encode())
        for source in SOURCES + HEADERS:
            digest.update(source.read_bytes())
        build = cache_root() / "kernels" / f"torch-{torch.__version__}-{digest.hexdigest()[:12]}"
        build.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        module = cpp_extension.load(name="esp_cpu_kernels", sources=[str(s) for s in SOURCES], extra_cflags=cflags,
                                    extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
        took = time.perf_counter() - t0
    except Exception as exc:  # no compiler, no ninja, no Python headers, a read-only cache ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return KernelStatus(None, frozenset(), f"not built ({first[:200]}): {_FALLBACK}")
    finally:
        os.environ["PATH"] = path
    names = ", ".join(str(d).removeprefix("torch.") for d in sorted(dtypes, key=str))
    return KernelStatus(module, frozenset(dtypes),
                        f"ours ({isa}): the pass in one C++ call, attention, norms, SiLU, and linears of {names} "
                        f"activations (float or int8 weights){bf16_note}; {w8a8_note} (ready in {took:.1f} s, {build})",
                        w8a8, isa)


def _ninja_dir() -> str | None:
    try:
        import ninja
    except ImportError:
        return None
    return getattr(ninja, "BIN_DIR", None)
