#!/usr/bin/env bash
cd /work/main
export OMP_NUM_THREADS=2
OUT=/work/bench_runs/s15/anchor3.txt
B=/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-bench
Q=/work/qwen/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
M=/work/llamacpp/models
date -u > $OUT; git log --oneline | head -1 | cut -c1-60 >> $OUT
run() { .venv/bin/python scripts/llamacpp_anchor.py --llama-bench $B --rounds 5 "$@" 2>/dev/null >> $OUT; }
run --gguf $M/qwen2.5-coder-0.5b-instruct-BF16.gguf --model $Q --dtype bfloat16
run --gguf $M/qwen2.5-coder-0.5b-instruct-F32.gguf --model $Q --dtype float32
run --gguf $M/SmolLM2-135M-Instruct.F32.gguf --model smollm2-135m-instruct --dtype float32
date -u >> $OUT
