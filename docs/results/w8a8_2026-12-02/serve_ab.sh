#!/usr/bin/env bash
# The default method against --method ar, fresh servers alternated: Qwen bf16 with QUANT (default int8), results in OUT.
cd /work/main
export OMP_NUM_THREADS=2
OUT=${OUT:-/work/bench_runs/s15/serve}; mkdir -p $OUT
Q=/work/qwen/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
P=../shared/data/spec_bench/question.jsonl
QUANT=${QUANT:-int8}
i=0
for cfg in ar default ar default; do
  i=$((i+1))
  extra=""; [ $cfg = ar ] && extra="--method ar"
  .venv/bin/esp-serve --model $Q --dtype bfloat16 --quantization $QUANT --port 8079 $extra > $OUT/server_${QUANT}_${cfg}_$i.log 2>&1 &
  pid=$!
  for t in $(seq 1 300); do grep -q "ready, listening" $OUT/server_${QUANT}_${cfg}_$i.log && break; sleep 1; done
  .venv/bin/esp-bench serve --base-url http://127.0.0.1:8079/v1 --prompts $P --per-category 1 --max-tokens 64 --ignore-eos \
    --concurrency 1 --no-progress --json $OUT/${QUANT}_${cfg}_$i.json > $OUT/${QUANT}_${cfg}_$i.txt 2>&1
  kill $pid; wait $pid 2>/dev/null
done
echo DONE
