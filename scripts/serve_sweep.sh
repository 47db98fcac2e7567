#!/usr/bin/env bash
# Serving throughput with and without speculation: starts esp-serve in several configurations on
# this machine, one at a time, and runs `esp-bench serve` against each.
#   [CONFIGS="ar pld-bc10"] [BASELINE_LEVELS=1,8] [BENCH_FLAGS="--system-prompt @FILE"] \
#     bash scripts/serve_sweep.sh [OUT_DIR] [CONCURRENCY] [MAX_TOKENS] [PER_CATEGORY]
# Results: OUT_DIR/serve_<name>.json and .txt (default out/serve). BENCH_FLAGS go to every
# `esp-bench serve` run.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/serve}; levels=${2:-1,4,16,32}; max_tokens=${3:-64}; per_category=${4:-2}
prompts=${PROMPTS:-../shared/data/spec_bench/question.jsonl}
port=${PORT:-8077}
mkdir -p "$out"

run() {  # name, concurrency levels, esp-serve flags...
  local name=$1 conc=$2; shift 2
  .venv/bin/esp-serve --port "$port" --log-level warning "$@" > "$out/server_$name.log" 2>&1 &
  local pid=$!
  trap 'kill $pid 2>/dev/null || true' RETURN
  for _ in $(seq 240); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
    sleep 0.5
  done
  .venv/bin/esp-bench serve --base-url "http://127.0.0.1:$port/v1" --prompts "$prompts" \
    --per-category "$per_category" --max-tokens "$max_tokens" --ignore-eos --concurrency "$conc" \
    --no-progress ${BENCH_FLAGS:-} --json "$out/serve_$name.json" | tee "$out/serve_$name.txt"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

configs=${CONFIGS:-one-at-a-time ar esp-bc30 pld-bc10 hybrid-bc10}
for name in $configs; do
  case $name in
    one-at-a-time) run one-at-a-time "${BASELINE_LEVELS:-1,8}" --method ar --max-num-seqs 1 ;;
    ar) run ar "$levels" --method ar ;;
    esp-bc30) run esp-bc30 "$levels" --method esp --preset bc30 ;;
    pld-bc10) run pld-bc10 "$levels" --method pld --preset bc10 ;;
    hybrid-bc10) run hybrid-bc10 "$levels" --method hybrid --preset bc10 ;;
    hybrid-bc30) run hybrid-bc30 "$levels" --method hybrid --preset bc30 ;;
    ar-no-prefix-cache) run ar-no-prefix-cache "$levels" --method ar --no-enable-prefix-caching ;;
  esac
done
