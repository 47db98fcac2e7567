#!/usr/bin/env bash
# Benchmarks for issue 15, session 17 (W8A8 prefetch, grouped attention, one LM-head call), 2 threads.
set -x
export OMP_NUM_THREADS=2
cd /work/main
OUT=docs/results/cpu_blocks_2026-12-02
Q=/work/qwen/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
P=../shared/data/spec_bench/question.jsonl
date -u; lscpu | grep -E "Model name"; uptime; git log --oneline | head -1
.venv/bin/python $OUT/step_pair.py $Q w8a8 1,2,4,6,10,16 > $OUT/step_pair_qwen_w8a8.txt 2>&1
.venv/bin/python $OUT/step_ab.py $Q esp:bc10 w8a8 > $OUT/step_ab_qwen_w8a8_esp.txt 2>&1
.venv/bin/esp-bench run --model smollm2-135m-instruct --dtype bfloat16 --quantization w8a8 --method ar,esp:bc10,pld:bc10,hybrid:bc10 \
    --prompts $P --per-category 2 --max-new-tokens 64 --threads 2 --check-lossless --no-progress \
    --json $OUT/bench_smol_bf16_w8a8.json > $OUT/bench_smol_bf16_w8a8.txt 2>&1
.venv/bin/esp-bench run --model $Q --dtype bfloat16 --method ar,esp:bc10,pld:bc10,hybrid:bc10 \
    --prompts $P --per-category 2 --max-new-tokens 48 --threads 2 --check-lossless --no-progress \
    --json $OUT/bench_qwen_bf16.json > $OUT/bench_qwen_bf16.txt 2>&1
OUT=$OUT/serve QUANT=w8a8 bash docs/results/w8a8_2026-12-02/serve_ab.sh
date -u
echo DONE
