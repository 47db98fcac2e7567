#!/usr/bin/env bash
# Benchmarks for issue 15, session 16 (W8A8 on AVX512-VNNI), 2 threads.
set -x
export OMP_NUM_THREADS=2
cd /work/main
OUT=docs/results/w8a8_2026-12-02
Q=/work/qwen/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
P=../shared/data/spec_bench/question.jsonl
B=/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-bench
date -u; lscpu | grep -E "Model name"; uptime; git log --oneline | head -1
for model in $Q smollm2-135m-instruct; do
  tag0=$(basename $model .gguf | cut -c1-12)
  for q in w8a8 int8; do
    .venv/bin/python scripts/step_cost.py --model $model --dtype bfloat16 --quantization $q --threads 2 --context 256 --repeats 5 --rows 1,4,10,16,30 > $OUT/step_${tag0}_bf16_$q.txt 2>/dev/null
  done
done
uptime
for q in w8a8 int8; do
  .venv/bin/esp-bench run --model $Q --dtype bfloat16 --quantization $q --method ar,esp:bc10,pld:bc10,hybrid:bc10 \
    --prompts $P --per-category 2 --max-new-tokens 48 --threads 2 --check-lossless --no-progress \
    --json $OUT/bench_qwen_bf16_$q.json > $OUT/bench_qwen_bf16_$q.txt 2>&1
  uptime
done
.venv/bin/esp-bench run --model smollm2-135m-instruct --dtype bfloat16 --quantization w8a8 --method ar,esp:bc10,pld:bc10,hybrid:bc10 \
    --prompts $P --per-category 2 --max-new-tokens 64 --threads 2 --check-lossless --no-progress \
    --json $OUT/bench_smol_bf16_w8a8.json > $OUT/bench_smol_bf16_w8a8.txt 2>&1
for model in $Q smollm2-135m-instruct; do
  tag0=$(basename $model .gguf | cut -c1-12)
  .venv/bin/python scripts/quant_quality.py --model $model --dtype bfloat16 --prompts $P --per-category 1 --limit 6 --max-new-tokens 32 --variants int8,w8a8 --threads 2 > $OUT/quality_${tag0}.txt 2>&1
done
.venv/bin/python scripts/llamacpp_anchor.py --llama-bench $B --gguf $Q --model $Q --dtype bfloat16 --quantization w8a8 --rounds 5 > $OUT/anchor_qwen_w8a8_q4km.txt 2>/dev/null
date -u
echo DONE
