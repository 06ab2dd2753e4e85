# round 10, call 6: the cheaper step key checked on the device; the whole-step graphs (TF32, bf16, stored
# noise) beside raw torch.compile, its bf16-noise form and the bare products, on one machine
set -uo pipefail
source benchmarks/gpu_env.sh
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 90 python3 -m pytest -q -p no:cacheprovider -p no:logging --tb=short tests/test_cuda_graphs.py \
  -k "equal_steps_without_graphs and regenerated or loaded_optimizer or tensor_learning" 2>&1 | grep -v "^DEBUG" | tail -8 | tee "$OUT/test_cuda_graphs.log"
timeout 170 python3 -m pyro_sp.cli bench gpu-single --model mlp --particles 32 64 --warmup 8 --steps 30 --tf32 --fused-adam \
  --back-to-back 5 --variants fused_regenerated_graphs fused_regenerated_bf16_graphs fused_analytic_graphs \
  --out "$OUT/steps.json" 2>&1 | grep -v -E "^INFO|USDT|^DEBUG" | tail -5
timeout 120 python3 benchmarks/gpu_peers.py torch --tf32 --gemm --bf16-noise --fused-adam --particles 32 64 --warmup 6 \
  --steps 20 --back-to-back 5 --out "$OUT/raw_torch_tf32.json" 2>&1 | tail -3
