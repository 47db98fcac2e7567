"""Quantization: int8 or int4 weights with activations in the model's dtype, or int8 weights
times int8 activations (W8A8).

`quantize_model(model, "int8" | "int4" | "w8a8")` replaces the layer linears of a `LlamaFamilyModel`
(wqkv, wo, w_gate_up, w_down) with the classes below, and the LM head with int8 (W8A8 for w8a8)
where our CPU kernel computes it (`quantize_lm_head_by_default`; `lm_head` overrides).
Embeddings, norms, RoPE tables and the KV cache keep the model's dtype. Each class is a
`PackedLinear` that replaces only construction and `matmul(x)`, so `forward` still applies the
layer's `RowPlan`.

  int8  one symmetric scale per output channel: w = q * s, q in [-127, 127]. Where the CPU
        kernels run (`cpu_kernels`: AVX512, float32 or bf16 activations) ours computes it: q is
        widened to the activations' dtype in registers (exactly: |q| <= 127), summed like the
        unquantized kernel's weights, and each output's sum multiplied by s. Elsewhere torch's
        `_weight_int8pack_mm` (x, q [N, K] int8, s [N] in x's dtype).
  w8a8  int8's q and s, and every linear's input quantized to int8 per row in groups of 32
        values along K (a scale each), in AVX512-VNNI's integer dot products: only on our
        kernels (`cpu_kernels.supports_w8a8`). The head is W8A8 too. Activation rounding makes
        its outputs differ from x W^T, by about what int8 weights alone differ from the
        unquantized model (docs/benchmarks.md); a row's result still depends on that row alone.
  int4  asymmetric groups of `INT4_GROUP_SIZE` weights along K: w = (q - 8) * s + z, q in
        [0, 15]; torch's `_convert_weight_to_int4pack_for_cpu` packs q two to a byte and
        `_weight_int4pack_mm_for_cpu` multiplies (s and z in x's dtype, [K/g, N, 2]).

Every one of these kernels computes each output element of a call on its own, one sum over K
in a fixed order: a row's result is the same whatever the call's row count (the tests check 1
to 130 rows), so speculative decoding stays lossless. torch's kernels vectorize only bfloat16
activations on x86 (AVX2/AVX512); with float32 or float16 they run scalar loops, correct but
slower than the unquantized model (docs/benchmarks.md has the numbers).

Shapes the kernels cannot take stay unquantized (logged): int8 needs K divisible by 16 (the
bfloat16 kernel reads 16 values at a time and silently reads past a shorter row), int4 needs
N divisible by 16 and K by the group size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from . import cpu_kernels
from .config import QUANTIZATION_METHODS
from .errors import ModelLoadError
from .model import LlamaFamilyModel, PackedLinear
from .row_invariance import RowPlan

log = logging.getLogger(__name__)

METHODS = QUANTIZATION_METHODS
INT4_GROUP_SIZE = 32  # the kernel takes 32, 64, 128 or 256; 32 divides every K of the models we run
_CHUNK_ROWS = 4096  # output channels quantized at a time (a multiple of 64, see Int4Linear)
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The LM head is quantized (int8) where our CPU kernel computes int8: there it streams half the
# bytes at any row count. Elsewhere (torch's int8 kernel) an int8 head saves no time at one row and
# costs more at the 10-32 rows speculation verifies, so it stays in the model's dtype.
# `scripts/quant_quality.py` measures agreement both ways.
def quantize_lm_head_by_default(dtype: torch.dtype, method: str = "int8") -> bool:
    return method == "w8a8" or cpu_kernels.supports_linear(dtype)


class _QuantizedLinear(PackedLinear):
    """What the quantized linears share: shape, bias, row plan; `weight` holds the integer weight."""

    method = ""

    def _init_common(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)  # not PackedLinear's: that would pack the dense weight for oneDNN
        self.out_features, self.in_features = weight.shape
        self.weight_dtype = dtype
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self.packed, self.kernel_scales, self.backend = None, None, "torch"
        self.row_plan = RowPlan()
        self._activation_dtype = dtype

    def activation_dtype(self) -> torch.dtype:
        return self._activation_dtype

    def kind(self) -> str:
        bias = "+bias" if self.bias is not None else ""
        return (f"{type(self).__name__}[{self.out_features}x{self.in_features}{bias}, "
                f"{self.scheme()}, {str(self._activation_dtype)[6:]}]")

    def scheme(self) -> str:
        return self.method

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self._activation_dtype:
            raise TypeError(f"{type(self).__name__} computes in {self._activation_dtype}, got {x.dtype}")
        return x.contiguous()

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] that the kernel multiplies by."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        return self.dequantize()

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.method}, activations {str(self._activation_dtype)[6:]}"


class Int8Linear(_QuantizedLinear):
    """y = x (q s)^T + b with q int8 [N, K] and one scale per output channel."""

    method = "int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        self._init_common(weight, bias, dtype)
        n, k = weight.shape
        q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
        scales = torch.empty(n, dtype=dtype, device=weight.device)
        for start in range(0, n, _CHUNK_ROWS):  # in chunks: float32 temporaries stay small
            w = weight[start : start + _CHUNK_ROWS].detach().to(torch.float32, copy=True)  # in place below
            amax = torch.maximum(w.amax(dim=1), w.amin(dim=1).neg_())
            # Round the scale to the activation dtype first: q is then the best for the scale used.
            scale = (amax / 127).clamp_min_(torch.finfo(dtype).tiny).to(dtype)
            scales[start : start + _CHUNK_ROWS] = scale
            q[start : start + _CHUNK_ROWS] = w.div_(scale.float()[:, None]).round_().clamp_(-127, 127)
        # None where our kernel's packed copy is the only one (`stored_weight` unpacks it).
        self.weight: nn.Parameter | None = nn.Parameter(q, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        self._pack(weight.device, dtype)
        if self.backend == "ours":
            self.weight = None

    def _pack(self, device: torch.device, dtype: torch.dtype) -> None:
        if device.type == "cpu" and cpu_kernels.supports_linear(dtype):
            # Our kernel widens q to the activations' dtype in registers: half the bytes of bf16
            # weights streamed, at the arithmetic rate of the unquantized kernel.
            self.packed = cpu_kernels.pack(self.weight.data, activations=dtype)
            self.kernel_scales = cpu_kernels.pad_scales(self.scales.data, self.packed)
            self.backend = "ours"

    @staticmethod
    def fits(out_features: int, in_features: int) -> bool:
        return in_features % 16 == 0

    def kind(self) -> str:
        return super().kind()[:-1] + f", {self.backend}]"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "ours":  # PackedLinear's: our kernel, with the scales
            return super().matmul(x)
        y = torch.ops.aten._weight_int8pack_mm(self._check(x), self.weight, self.scales)
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> torch.Tensor:
        return self.stored_weight().float() * self.scales.float()[:, None]

    def weight_rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.stored_weight(index).float() * self.scales[index].float()[:, None]


class W8A8Linear(Int8Linear):
    """Int8Linear's q and s times activations quantized to int8 per row, in groups of
    `cpu_kernels.W8A8_GROUP` along K with a scale each (`kernels/w8a8_cpu.cpp`, AVX512-VNNI):
    the only one of these methods that also quantizes what the weights multiply, so the only
    one whose output is not x W^T of its weights. Each output depends on its row of x alone."""

    method = "w8a8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        if weight.device.type != "cpu" or not cpu_kernels.supports_w8a8(dtype):
            raise ModelLoadError(f"W8A8 needs our CPU kernels with AVX512-VNNI and float32 or bfloat16 "
                                 f"activations ({cpu_kernels.status().reason})")
        super().__init__(weight, bias, dtype)

    def _pack(self, device: torch.device, dtype: torch.dtype) -> None:
        self.packed = cpu_kernels.pack_w8a8(self.weight.data)
        self.kernel_scales = cpu_kernels.pad_scales(self.scales.data, self.packed)
        self.backend = "ours"

    @staticmethod
    def fits(out_features: int, in_features: int) -> bool:
        return True  # the packing pads K to whole groups

    def scheme(self) -> str:
        return f"w8a8 g{cpu_kernels.W8A8_GROUP}"


class Int4Linear(_QuantizedLinear):
    """y = x W^T + b with W = (q - 8) s + z per group of `group_size` weights along K, q in 0..15."""

    method = "int4"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 group_size: int = INT4_GROUP_SIZE) -> None:
        self._init_common(weight, bias, dtype)
        n, k = weight.shape
        self.group_size = group_size
        packed, scales_and_zeros = [], []
        # Chunks of whole 64-row blocks: the kernel packs each block of 64 output channels (32 on
        # AVX2) on its own, so packing chunk by chunk gives the same bytes as packing all at once.
        for start in range(0, n, _CHUNK_ROWS):
            chunk = weight[start : start + _CHUNK_ROWS].detach().to(torch.float32, copy=True)  # in place below
            groups = chunk.reshape(-1, k // group_size, group_size)
            lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
            scale = ((hi - lo) / 15).clamp_min_(torch.finfo(dtype).tiny).to(dtype).float()
            zero = (lo + 8 * scale).to(dtype).float()  # the kernel's zero is the value of q = 8
            q = groups.sub_(zero[..., None]).div_(scale[..., None]).add_(8).round_().clamp_(0, 15)
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(-1, k).to(torch.int32), 8))
            scales_and_zeros.append(torch.stack([scale, zero], dim=-1).to(dtype))
        self.weight = nn.Parameter(torch.cat(packed), requires_grad=False)
        # [K/g, N, 2]: (scale, zero) of group g of output channel n, as the kernel reads them.
        self.scales_and_zeros = nn.Parameter(torch.cat(scales_and_zeros).transpose(0, 1).contiguous(),
                                             requires_grad=False)

    def scheme(self) -> str:
        return f"int4 g{self.group_size}"

    @staticmethod
    def fits(out_features: int, in_features: int, group_size: int = INT4_GROUP_SIZE) -> bool:
        return out_features % 16 == 0 and in_features % group_size == 0

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(self._check(x), self.weight, self.group_size,
                                                       self.scales_and_zeros)
        return y if self.bias is None else y + self.bias

    def dequantize(self) -> torch.Tensor:
        # The packed layout is the kernel's own (it differs between AVX512, AVX2 and plain
        # builds), so W is read back through the kernel: the float32 product with the identity
        # is one weight times 1.0 per output. A scalar loop over N*K*K: for tests on small layers.
        eye = torch.eye(self.in_features, dtype=torch.float32)
        sz = self.scales_and_zeros.float()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size, sz).T.contiguous()

    def weight_rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.dequantize()[index]  # slow: `quantize_model` never makes an int4 head


_CLASSES = {"int8": Int8Linear, "int4": Int4Linear, "w8a8": W8A8Linear}
# A quantized LM head is int8 for either method, as llama.cpp's Q4_K_M keeps its output matrix at
# 6 bits: it is where quantization error shows most directly in the logits, and bf16 greedy decoding
# re-sums near-top logits from float32 rows of W (`model._refine_top`), which int8 gives cheaply.
_HEAD_CLASSES = {"int8": Int8Linear, "int4": Int8Linear, "w8a8": W8A8Linear}


@dataclass(frozen=True, slots=True)
class QuantizationReport:
    """What `quantize_model` did, for the startup log and benchmarks."""

    method: str
    quantized: tuple[str, ...]  # module names replaced
    kept: tuple[str, ...]  # linears left unquantized (shape the kernel cannot take)
    bytes_before: int  # weight bytes of the linears replaced, before
    bytes_after: int  # and after (integer weights, scales, zeros)

    def summary(self) -> str:
        text = (f"quantization {self.method}: {len(self.quantized)} linears, "
                f"{self.bytes_before / 2**20:.0f} MiB -> {self.bytes_after / 2**20:.0f} MiB")
        if self.kept:
            text += f"; kept unquantized (shape): {', '.join(self.kept)}"
        return text


def check_supported(method: str, device: str | torch.device, dtype: torch.dtype) -> None:
    """Raise `ModelLoadError` for a method, device or activation dtype the kernels do not take."""
    if method not in METHODS:
        raise ModelLoadError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")
    if method == "none":
        return
    if torch.device(device).type != "cpu":
        raise ModelLoadError(
            f"--quantization {method} runs on CPU only (torch's weight-only int8/int4 CPU kernels); "
            f"the device is {device!r}: use --device cpu or --quantization none")
    if dtype not in ACTIVATION_DTYPES:
        raise ModelLoadError(f"--quantization {method} needs float32, bfloat16 or float16 activations, not {dtype}")
    if method == "w8a8" and not cpu_kernels.supports_w8a8(dtype):
        raise ModelLoadError(f"--quantization w8a8 runs on our CPU kernels with AVX512-VNNI, in float32 or bfloat16 "
                             f"({cpu_kernels.status().reason}); use --quantization int8")


def quantize_model(model: LlamaFamilyModel, method: str, *, lm_head: bool | None = None) -> QuantizationReport:
    """Replace the model's linears by `method`'s quantized ones, in place; activations stay in
    the model's dtype. The LM head too (int8) if `lm_head`, by default where our CPU kernel
    computes int8. Call before the row-invariance probe, which must see the final kernels."""
    check_supported(method, model.device, model.dtype)
    if method == "none":
        return QuantizationReport(method, (), (), 0, 0)
    if lm_head is None:
        lm_head = model.device.type == "cpu" and quantize_lm_head_by_default(model.dtype, method)
    targets = [(f"layers.{i}.{name}", layer, name, _CLASSES[method]) for i, layer in enumerate(model.layers)
               for name in ("wqkv", "wo", "w_gate_up", "w_down")]
    if lm_head:
        targets.append(("lm_head", model, "lm_head", _HEAD_CLASSES[method]))
    done = [label for label, owner, name, _ in targets if isinstance(getattr(owner, name), _QuantizedLinear)]
    if done:
        raise ModelLoadError(f"the model is quantized already ({', '.join(done[:3])}{', ...' if len(done) > 3 else ''})")
    quantized, kept, before, after = [], [], 0, 0
    for label, owner, name, cls in targets:
        dense: PackedLinear = getattr(owner, name)
        if not cls.fits(dense.out_features, dense.in_features):
            kept.append(f"{label} {dense.out_features}x{dense.in_features}")
            continue
        new = cls(dense.dense_weight(), None if dense.bias is None else dense.bias.data, model.dtype)
        before += dense.out_features * dense.in_features * dense.weight_dtype.itemsize
        after += new.stored_bytes()
        setattr(owner, name, new)
        quantized.append(label)
    model.layers_changed()
    report = QuantizationReport(method, tuple(quantized), tuple(kept), before, after)
    if kept:
        log.warning("%s", report.summary())
    return report

