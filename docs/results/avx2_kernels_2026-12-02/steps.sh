cd /work/main
for m in smol; do
for k in 1 0; do echo "== kernel=$k"; ESP_SERVE_CPU_KERNEL=$k ESP_SERVE_CACHE=/tmp/cache18 .venv/bin/python scripts/step_cost.py --dtype float32 --threads 2 --rows 1,4,10,16 --repeats 20 2>&1 | tail -8; done; done
