#!/usr/bin/env bash
# At the session's last kernel (e195090): Qwen w8a8 esp-bench, decode-pass A/B, the serve A/B.
set -x
export OMP_NUM_THREADS=2
cd /work/main
OUT=docs/results/cpu_blocks_2026-12-02
Q=/work/qwen/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
P=../shared/data/spec_bench/question.jsonl
date -u; git log --oneline | head -1
.venv/bin/esp-bench run --model $Q --dtype bfloat16 --quantization w8a8 --method ar,esp:bc10,esp:bc30,pld:bc10,hybrid:bc10 \
    --prompts $P --per-category 2 --max-new-tokens 48 --threads 2 --check-lossless --no-progress \
    --json $OUT/final_bench_qwen_w8a8.json > $OUT/final_bench_qwen_w8a8.txt 2>&1
.venv/bin/python $OUT/step_pair.py $Q w8a8 1,2,4,6,10,16 > $OUT/final_step_pair_qwen_w8a8.txt 2>&1
OUT=$OUT/serve_final QUANT=w8a8 bash docs/results/w8a8_2026-12-02/serve_ab.sh
date -u
echo DONE
