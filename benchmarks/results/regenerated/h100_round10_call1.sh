# round 10, call 1: the whole-step graphs checked (GPU tests, full-size check), then timed
set -uo pipefail
source benchmarks/gpu_env.sh
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
BENCH="python3 -m pyro_sp.cli bench"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
timeout 210 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_graphs.py 2>&1 | tail -30 | tee "$OUT/test_cuda_graphs.log"
timeout 80 python3 benchmarks/graphs_check.py --particles 8 --steps 6 --out "$OUT/graphs_check.json" 2>&1 | cut -c1-400 | tail -3
timeout 170 $BENCH gpu-single --model mlp --particles 32 64 --warmup 8 --steps 30 --tf32 --fused-adam --back-to-back 5 \
  --variants fused_regenerated_graphs fused_regenerated fused_regenerated_bf16_graphs --out "$OUT/steps.json" 2>&1 \
  | grep -v -E "^INFO|USDT" | tail -14
timeout 90 python3 benchmarks/gpu_peers.py torch --tf32 --gemm --fused-adam --particles 32 64 --warmup 6 --steps 20 \
  --back-to-back 5 --out "$OUT/raw_torch_tf32.json" 2>&1 | tail -4
