# Would W8A8 (int8 weights as --quantization int8, activations quantized per row to int8 at every
# linear's input) keep quality? Fake-quantized activations on the op-by-op pass, against bf16.
import sys, torch, types
sys.path.insert(0, "scripts")
torch.set_num_threads(2)
from quant_quality import sequence_logits, compare
from esp_bench.common import load_prompts, prompt_ids
from esp_engine.config import SamplingParams, SpecConfig
from esp_engine.engine import LLMEngine
from esp_engine.loader import load_model
from esp_engine.quantization import quantize_model, Int8Linear
model_name = sys.argv[1]; group = int(sys.argv[2]) if len(sys.argv) > 2 else 0
loaded = load_model(model_name, dtype="bfloat16")
qs = load_prompts("../shared/data/spec_bench/question.jsonl", 1, 6)
eng = LLMEngine(loaded)
seqs = []
for q in qs:
    ids = prompt_ids(loaded.tokenizer, q.text)
    out = eng.generate(ids, SamplingParams(max_new_tokens=32), SpecConfig(method="ar"))
    seqs.append(ids + list(out.output_ids)); 
starts = [len(prompt_ids(loaded.tokenizer, q.text)) - 1 for q in qs]
def logits_all(m):
    res = []
    for seq, a in zip(seqs, starts):
        res.append(sequence_logits(m, seq)[a:-1].float())
    return torch.cat(res)
ref = logits_all(loaded.model)
quantize_model(loaded.model, "int8", lm_head=True)
print("int8 (weight-only):", compare(ref, logits_all(loaded.model)))
orig = Int8Linear.matmul
def fake(self, x):
    xf = x.float()
    if group:
        g = xf.view(xf.shape[0], -1, group)
        s = (g.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
        xq = (torch.round(g / s) * s).view_as(xf)
    else:
        s = (xf.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
        xq = torch.round(xf / s) * s
    return orig(self, xq.to(x.dtype))
Int8Linear.matmul = fake
loaded.model.use_cpu_decoder = False
print(f"w8a8 (activations per row{' per group of %d' % group if group else ''}):", compare(ref, logits_all(loaded.model)))
