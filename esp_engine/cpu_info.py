"""What a Linux CPU reports about itself in /proc/cpuinfo: its model name and instruction flags.

Two decisions read it: `--dtype auto` (does the CPU compute bf16 natively?) and the row-plan
cache key (kernels are chosen by instruction set, so plans found on one CPU do not carry over).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class CpuInfo:
    model_name: str
    flags: tuple[str, ...]  # in the order the kernel lists them, so a hash of them is stable


def parse_cpu_info(text: str) -> CpuInfo:
    """The first processor's model name and flags in a /proc/cpuinfo text."""
    name, flags = "", ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key == "flags":
            flags = tuple(value.split())
            break
    return CpuInfo(name or platform.processor() or platform.machine(), flags)


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CpuInfo; no flags where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        return parse_cpu_info(Path("/proc/cpuinfo").read_text())
    except OSError:
        return parse_cpu_info("")
