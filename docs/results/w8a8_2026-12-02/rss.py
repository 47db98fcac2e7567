import sys, resource, torch
sys.path.insert(0, ".")
from esp_engine.loader import load_model
from esp_engine.engine import LLMEngine
from esp_engine.config import SamplingParams, SpecConfig
q = sys.argv[2] if len(sys.argv) > 2 else "none"
loaded = load_model(sys.argv[1], dtype="bfloat16", quantization=q)
import gc, ctypes; gc.collect()
if "trim" in sys.argv: ctypes.CDLL("libc.so.6").malloc_trim(0)
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"): return int(line.split()[1]) / 1024
print(f"{q}: RSS after load {rss():.0f} MiB, stored_bytes {getattr(loaded.model, 'stored_bytes', lambda: 0)() / 2**20:.0f} MiB, peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MiB")
