# round 10, call 5: the whole-step graphs against round 9's graphs (3df5ced's package) on one machine;
# the host's time per step; the ViT-small with and without the graphs
set -uo pipefail
source benchmarks/gpu_env.sh
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
BASE=.whl/cur timeout 300 bash benchmarks/compiled_round.sh ab 2>&1 | tail -24
timeout 60 python3 .whl/hostprof_gpu.py > "$OUT/hostprof.txt" 2>&1; head -3 "$OUT/hostprof.txt"
timeout 170 python3 -m pyro_sp.cli bench gpu-single --model vit --particles 8 32 --warmup 4 --steps 12 --tf32 --fused-adam \
  --back-to-back 3 --variants fused_analytic_graphs fused_analytic --out "$OUT/vit.json" 2>&1 | grep -v -E "^INFO|USDT|^DEBUG" | tail -6
