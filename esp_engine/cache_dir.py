"""Where esp-serve keeps what it computes once per machine: dequantized models, row plans, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$ESP_SERVE_CACHE`, else `$XDG_CACHE_HOME/esp-serve`, else `~/.cache/esp-serve`."""
    base = os.environ.get("ESP_SERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "esp-serve"
    )
    return Path(base)
