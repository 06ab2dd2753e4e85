# round 11, call 1: the graph tests on the device; the targets side by side on one machine: MeanFieldVI's graph
# steps (TF32, bf16 products) and the step without graphs, raw torch.compile with the bare products
set -uo pipefail
source benchmarks/gpu_env.sh
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 230 python3 -m pytest -q -p no:cacheprovider -p no:logging --tb=short tests/test_cuda_graphs.py tests/test_fit_on_cuda.py 2>&1 \
  | grep -v "^DEBUG" | tail -25 | tee "$OUT/test_cuda_graphs.log"
timeout 200 python3 -m pyro_sp.cli bench gpu-single --model mlp --particles 32 64 --warmup 8 --steps 30 --tf32 --fused-adam \
  --back-to-back 5 --variants fused_regenerated_graphs fused_regenerated_bf16_graphs fused_regenerated \
  --out "$OUT/steps.json" 2>&1 | grep -v -E "^INFO|USDT|^DEBUG" | tail -8
timeout 120 python3 benchmarks/gpu_peers.py torch --tf32 --gemm --fused-adam --particles 32 64 --warmup 6 \
  --steps 20 --back-to-back 5 --out "$OUT/raw_torch.json" 2>&1 | tail -3
