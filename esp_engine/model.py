"""The forward pass of the Llama family (Llama, SmolLM2, Mistral, Qwen2, Qwen3), owned by us.

transformers supplies config and weights; this module fuses them into a few large matrices
and runs the pass over an engine-owned KV cache (`kv_cache.KVCache`), so that a decode step is
a short, fixed sequence of ops with no cache objects or mask builders of transformers in it.
Rows of one call may be any mix of real tokens and mask vectors, at arbitrary positions,
under an arbitrary boolean attention mask: that is what tree verification needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .attention import BatchAttention
from .row_invariance import RowPlan
from .kv_cache import KVCache

SUPPORTED_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3"}


@dataclass(frozen=True, slots=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position: int


class _RMSNorm(nn.Module):
    """The checkpoint's RMSNorm as one op: our CPU kernel (`cpu_kernels.rms_norm`) where it runs,
    else `F.rms_norm` (transformers' version takes six tensor ops, and a pass runs 2 per layer
    plus one)."""

    def __init__(self, hf_norm: nn.Module) -> None:
        super().__init__()
        self.weight = hf_norm.weight
        self.eps = float(getattr(hf_norm, "variance_epsilon", getattr(hf_norm, "eps", 1e-6)))
        self.use_kernel = self.weight.device.type == "cpu" and cpu_kernels.supports_elementwise(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel:
            return cpu_kernels.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _silu_mul(gate_up: torch.Tensor, intermediate: int, use_kernel: bool) -> torch.Tensor:
    """silu(gate) * up of the fused projection's output [R, 2I]."""
    if use_kernel:
        return cpu_kernels.silu_mul(gate_up)
    return F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]


class _Layer(nn.Module):
    def __init__(self, hf_layer: nn.Module, shape: ModelShape) -> None:
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.input_norm = _RMSNorm(hf_layer.input_layernorm)
        self.post_norm = _RMSNorm(hf_layer.post_attention_layernorm)
        # Fused projections: one matmul instead of three (qkv) and two (gate/up) per layer.
        self.wqkv = _fuse_linear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.wo = PackedLinear.from_linear(attn.o_proj)
        self.w_gate_up = _fuse_linear([mlp.gate_proj, mlp.up_proj])
        self.w_down = PackedLinear.from_linear(mlp.down_proj)
        self.q_norm = getattr(attn, "q_norm", None)  # Qwen3 normalises q and k per head
        self.k_norm = getattr(attn, "k_norm", None)
        self.num_heads, self.num_kv_heads, self.head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
        self.q_size = shape.num_heads * shape.head_dim
        self.kv_size = shape.num_kv_heads * shape.head_dim
        self.intermediate = mlp.gate_proj.out_features
        self.silu_mul_kernel = self.post_norm.use_kernel  # decided by the same device and dtype


def _fuse_linear(linears: list[nn.Linear]) -> "PackedLinear":
    weight = torch.cat([lin.weight.data for lin in linears], dim=0)
    bias = torch.cat([lin.bias.data for lin in linears], dim=0) if linears[0].bias is not None else None
    return PackedLinear(weight, bias)


class PackedLinear(nn.Module):
    """y = x W^T + b, with W packed once for the CPU kernel that computes it.

    `backend` is "ours" (`cpu_kernels`: AVX512 CPUs, float32 and bf16 where the CPU has native
    bf16), else "onednn" (oneDNN on a weight reordered once: MKL's sgemm is slow for the 2..64-row
    inputs tree blocks are made of, while oneDNN costs about the same for 1 to 8 rows), else "torch"
    (F.linear: on a GPU, or where oneDNN is missing or cannot take the dtype).
    """

    _PACK_BATCH_HINT = 8  # measured: packing for 8 rows is fast from 1 to 64 rows

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        # None where our kernel's packed copy is the only one (`dense_weight` unpacks it): a
        # second copy in memory would be read by nothing on the hot path.
        self.weight: nn.Parameter | None = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = weight.shape
        self.weight_dtype = weight.dtype
        self.packed: torch.Tensor | None = None
        self.kernel_scales: torch.Tensor | None = None  # int8 weights' per-output scales, for our kernel
        self.backend = "torch"
        # How calls are shaped so that a row's result does not depend on the call's row count
        # (`row_invariance.probe_model` sets it per weight shape at load).
        self.row_plan = RowPlan()
        if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
            return
        if cpu_kernels.supports_linear(weight.dtype):
            self.packed, self.backend = cpu_kernels.pack(weight), "ours"
            self.weight = None
        elif _onednn_ok():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, self._PACK_BATCH_HINT)
                self.backend = "onednn"
            except RuntimeError:  # oneDNN's bf16 path needs AVX512 (BW/VL/DQ) or AVX-NE-CONVERT
                self.packed = None

    def kind(self) -> str:
        """What the kernel a call gets depends on, besides its row count."""
        bias = "+bias" if self.bias is not None else ""
        dtype = str(self.weight_dtype).removeprefix("torch.")
        return f"{type(self).__name__}[{self.out_features}x{self.in_features}{bias}, {dtype}, {self.backend}]"

    def activation_dtype(self) -> torch.dtype:
        return self.weight_dtype

    def weight_device(self) -> torch.device:
        return (self.weight if self.weight is not None else self.packed).device

    def stored_weight(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as stored (int8 subclasses: q), or rows `index` of it, unpacked from our
        kernel's layout where that is the only copy."""
        if self.weight is not None:
            return self.weight.data if index is None else self.weight.data[index]
        if index is None:
            return cpu_kernels.unpack(self.packed, self.out_features, self.in_features)
        return cpu_kernels.unpack_rows(self.packed, index, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        """W [N, K] in its dtype."""
        return self.stored_weight()

    def weight_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` of W as float32 (quantized subclasses dequantize them)."""
        return self.stored_weight(index).float()

    def stored_bytes(self) -> int:
        """Bytes of the weights, scales and bias as held (our kernel's packed copy and its scales
        where that copy is the only one)."""
        held = list(self.parameters())
        if self.weight is None:
            held += [t for t in (self.packed, self.kernel_scales) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "PackedLinear":
        return cls(linear.weight.data, None if getattr(linear, "bias", None) is None else linear.bias.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.row_plan.apply(self.matmul, x)

    def kernel_spec(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        """(packed weight, int8 scales or None, bias or None) where our CPU kernel computes this
        linear, for `cpu_kernels.CpuDecoder`; else None."""
        if self.backend != "ours":
            return None
        return self.packed, self.kernel_scales, None if self.bias is None else self.bias.data

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        """x as the kernels take it (quantized subclasses also check its dtype)."""
        return x.contiguous()

    def float_out(self, x: torch.Tensor) -> torch.Tensor | None:
        """x W^T + b as the float32 sums, not rounded to x's dtype, where the kernel gives them
        (ours); else None."""
        if self.backend != "ours":
            return None
        return cpu_kernels.linear(self._check(x), self.packed, self.out_features, self.bias, float_out=True,
                                  scales=self.kernel_scales)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel itself, for any number of rows (subclasses for other weight formats replace this)."""
        if self.backend == "ours":
            return cpu_kernels.linear(self._check(x), self.packed, self.out_features, self.bias,
                                      scales=self.kernel_scales)
        if self.backend == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _onednn_ok() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except Exception:  # pragma: no cover - exotic builds
        return False


def _refine_top(logits: torch.Tensor, hidden: torch.Tensor, head: "PackedLinear") -> torch.Tensor:
    top = logits.max(dim=-1, keepdim=True).values
    ulp = torch.finfo(hidden.dtype).eps * torch.exp2(torch.floor(torch.log2(top.abs().clamp_min(1e-30))))
    rows, cols = torch.nonzero(logits >= top - 2 * ulp, as_tuple=True)
    exact = (hidden[rows].float() * head.weight_rows(cols)).sum(dim=-1)
    if head.bias is not None:
        exact += head.bias[cols].float()
    logits[rows, cols] = exact
    return logits


_UNBUILT = object()


def _build_cpu_decoder(model: "LlamaFamilyModel"):
    """`cpu_kernels.CpuDecoder` over the model's layers, or None where a layer needs something it
    does not run: a linear off our kernel (oneDNN, int4), per-head q/k norms (Qwen3), norms
    or SiLU on torch ops, attention the kernel does not take, norms of different epsilons."""
    shape, layers = model.shape, list(model.layers)
    if model.device.type != "cpu" or shape.head_dim % 32 or not cpu_kernels.supports_attention(model.dtype, shape.head_dim):
        return None
    specs = [[getattr(layer, name).kernel_spec() for layer in layers] for name in ("wqkv", "wo", "w_gate_up", "w_down")]
    if any(spec is None for group in specs for spec in group):
        return None
    norms = [n for layer in layers for n in (layer.input_norm, layer.post_norm)]
    if any(layer.q_norm is not None or not layer.silu_mul_kernel for layer in layers):
        return None
    if not all(n.use_kernel for n in norms) or len({n.eps for n in norms}) != 1:
        return None
    if model.rope_cos.dtype != model.dtype:
        return None

    return cpu_kernels.status().module.CpuDecoder(
        shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim, layers[0].intermediate, norms[0].eps,
        model.scale, model.rope_cos, model.rope_sin_signed,
        [layer.input_norm.weight.data for layer in layers], [layer.post_norm.weight.data for layer in layers], *specs)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x [R, H, D] rotated: x cos + rotate_half(x) sin, with rotate_half(x) sin = flip(halves of x) sin_signed."""
    rows, heads, dim = x.shape
    swapped = x.reshape(rows, heads, 2, dim // 2).flip(2).view(rows, heads, dim)
    return x * cos + swapped * sin_signed


class LlamaFamilyModel(nn.Module):
    """Decoder-only transformer of the Llama family over a `KVCache`.

    `forward(cache, embeds, positions, attn_mask)` appends the rows' keys and values at the
    cache's current length and returns final-norm hidden states; `logits(hidden)` applies the
    LM head to just the rows a caller needs (verification rows, one owner's masks), which saves
    most of the head's cost on big blocks.
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        cfg = hf_model.config
        if cfg.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {cfg.model_type!r} is not in the Llama family")
        inner = hf_model.model
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.shape = ModelShape(
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            vocab_size=cfg.vocab_size,
            max_position=cfg.max_position_embeddings,
        )
        self.embed_tokens = inner.embed_tokens
        self.layers = nn.ModuleList(_Layer(layer, self.shape) for layer in inner.layers)
        self.norm = _RMSNorm(inner.norm)
        self.lm_head = PackedLinear.from_linear(hf_model.lm_head)
        self.scale = head_dim**-0.5
        # RoPE tables from transformers' own rotary module, so every rope_type (llama3, yarn, ...)
        # is computed the way the checkpoint expects; cached once for all positions.
        positions = torch.arange(self.shape.max_position, device=self.embed_tokens.weight.device)[None]
        cos, sin = inner.rotary_emb(self.embed_tokens.weight[:1], positions)
        self.register_buffer("rope_cos", cos[0].to(self.embed_tokens.weight.dtype), persistent=False)
        # sin with its first half negated: rotating half of x is then a flip of its two halves
        # times this, one op instead of rotate_half's four, with the same bits (negation is exact).
        half = head_dim // 2
        sin_signed = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
        self.register_buffer("rope_sin_signed", sin_signed.to(self.embed_tokens.weight.dtype), persistent=False)
        # Built at the first pass, from the layers as they are then (after quantization).
        self.use_cpu_decoder = True
        self._cpu_decoder = _UNBUILT

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(token_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [R, V] of the rows `hidden` [R, hidden].

        Below float32 a head that rounds its output to the dtype leaves a few bits, so the top
        tokens often tie exactly and the slightest change in the hidden state flips which one
        wins. Our CPU kernel gives the float32 sums themselves. Elsewhere the tokens that can be
        the largest (within two units in the last place of the row's maximum) are recomputed
        with float32 sums, the same for a row in any call. Either way the greedy choice depends
        on the hidden state continuously instead of on where rounding falls.
        """
        if hidden.dtype != torch.float32:
            sums = self.lm_head.float_out(hidden)
            if sums is not None:
                return sums
        logits = self.lm_head(hidden).float()
        if hidden.dtype == torch.float32:
            return logits
        return _refine_top(logits, hidden, self.lm_head)

    @torch.inference_mode()
    def forward(
        self,
        cache: KVCache,
        embeds: torch.Tensor,  # [M, hidden]
        positions: torch.Tensor,  # [M] int64 position ids
        attn_mask: torch.Tensor | None,  # [M, M] bool over the new rows (True = may attend); None = causal
    ) -> torch.Tensor:
        """Run M new rows after the cache's `length` entries; returns hidden states [M, hidden].

        The rows' K/V land in cache slots [length, length+M) and `cache.length` grows by M;
        the caller trims or compacts afterwards. Every row sees the whole existing cache.
        """
        return self.forward_batch([cache], embeds, positions, [attn_mask], [embeds.shape[0]])

    @torch.inference_mode()
    def forward_batch(
        self,
        caches: list[KVCache],
        embeds: torch.Tensor,  # [sum(M_i), hidden]: the rows of every sequence, one after another
        positions: torch.Tensor,  # [sum(M_i)]
        attn_masks: list[torch.Tensor | None],  # per sequence, [M_i, M_i] or None (causal)
        num_rows: list[int],  # M_i
    ) -> torch.Tensor:
        """`forward` for several sequences in one pass.

        Every matmul runs once over all rows, so the weights are read once per step whatever
        the batch (on a CPU as on a GPU, that read is most of a small-batch step); attention
        sees each sequence's own cache under its own tree mask (`attention.BatchAttention`).
        """
        attention = BatchAttention(caches, attn_masks, num_rows, embeds.device)
        decoder = self.cpu_decoder() if attention.invariant else None
        if decoder is None:
            return self.forward_rows(embeds, positions, attention)
        keys, values, row_bounds, slot_starts, masks = attention.layout()
        x = decoder.forward(embeds, positions, keys, values, row_bounds, slot_starts, masks)
        attention.finish()
        return self.norm(x)

    def stored_bytes(self) -> int:
        """Bytes of the weights as held in memory (packed copies where they are the only ones)."""
        total = 0
        for module in self.modules():
            if isinstance(module, PackedLinear):
                total += module.stored_bytes()
            else:
                total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        return total

    def cpu_decoder(self):
        """The C++ pass over all layers (`cpu_kernels.CpuDecoder`), built at the first call, or
        None where some part of a layer does not run on our CPU kernels (then `forward_rows`
        runs op by op, with the same bits where both run) or `use_cpu_decoder` is False."""
        if not self.use_cpu_decoder:
            return None
        if self._cpu_decoder is _UNBUILT:
            self._cpu_decoder = _build_cpu_decoder(self)
        return self._cpu_decoder

    def layers_changed(self) -> None:
        """Call after replacing a layer's modules (quantization): the next pass rebuilds the C++ one."""
        self._cpu_decoder = _UNBUILT

    @torch.inference_mode()
    def forward_rows(self, embeds: torch.Tensor, positions: torch.Tensor, attention) -> torch.Tensor:
        """The layers over rows whose key/value writes and attention `attention` does: `write(layer,
        k, v)`, `attend(layer, q, scale)` and `finish()`: `BatchAttention`, or one of the padded
        batch's (`padded_attention`), whose passes a CUDA graph can capture."""
        total = embeds.shape[0]
        cos = self.rope_cos[positions][:, None, :]  # [R, 1, D]
        sin = self.rope_sin_signed[positions][:, None, :]
        x = embeds
        for i, layer in enumerate(self.layers):
            h = layer.input_norm(x)
            qkv = layer.wqkv(h)
            heads, qk_size = layer.num_heads, layer.q_size + layer.kv_size
            v = qkv[:, qk_size:].view(total, layer.num_kv_heads, layer.head_dim)
            if layer.q_norm is None:
                # q and k rotated as one tensor: half the ops of rotating each.
                qk = _rope(qkv[:, :qk_size].view(total, heads + layer.num_kv_heads, layer.head_dim), cos, sin)
                q, k = qk[:, :heads], qk[:, heads:]
            else:
                q = _rope(layer.q_norm(qkv[:, : layer.q_size].view(total, heads, layer.head_dim)), cos, sin)
                k = _rope(layer.k_norm(qkv[:, layer.q_size : qk_size].view(total, layer.num_kv_heads, layer.head_dim)),
                          cos, sin)
            attention.write(i, k, v)
            attn = attention.attend(i, q, self.scale)
            x = x + layer.wo(attn.reshape(total, layer.q_size))
            h = layer.post_norm(x)
            gate_up = layer.w_gate_up(h)
            x = x + layer.w_down(_silu_mul(gate_up, layer.intermediate, layer.silu_mul_kernel))
        attention.finish()
        return self.norm(x)
