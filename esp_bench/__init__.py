"""`esp-bench`: the benchmarks. `esp-bench run` (engine_bench.py) runs the engine in this process;
`esp-bench serve` (serve_bench.py) drives a running server; common.py is what they and the scripts
share."""
