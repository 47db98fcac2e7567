#!/usr/bin/env bash
# llama.cpp tg128 and our one-row pass, interleaved, two rounds each, 2 threads.
cd /work/main
export OMP_NUM_THREADS=2
OUT=/work/bench_runs/s14/anchor.txt
B=/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin
Q=/work/qwen/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
date -u > $OUT; git log --oneline | head -1 >> $OUT
for round in 1 2; do
  for cfg in "smollm2-135m-instruct float32 /work/llamacpp/models/SmolLM2-135M-Instruct.F32.gguf" \
             "smollm2-135m-instruct bfloat16 /work/llamacpp/models/SmolLM2-135M-Instruct.BF16.gguf" \
             "$Q float32 /work/llamacpp/models/qwen2.5-coder-0.5b-instruct-F32.gguf" \
             "$Q bfloat16 /work/llamacpp/models/qwen2.5-coder-0.5b-instruct-BF16.gguf"; do
    set -- $cfg
    echo "round $round $1 $2" >> $OUT
    $B/llama-bench -m $3 -t 2 -p 0 -n 128 -r 2 2>/dev/null | grep tg128 >> $OUT
    for ctx in 64 256; do
      .venv/bin/python scripts/step_cost.py --model $1 --dtype $2 --threads 2 --context $ctx --repeats 7 --rows 1 2>/dev/null | grep -E "^\| 1 |^#" >> $OUT
    done
  done
done
date -u >> $OUT
