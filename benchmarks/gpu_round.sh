#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md ("Fused step" sections), one phase per call:
#   bash benchmarks/gpu_round.sh single   # 2 GPUs used as two single-GPU benches: MLP on GPU 0, ViT on GPU 1
#   bash benchmarks/gpu_round.sh scaling  # 1 and 2 GPUs: MeanFieldVI sample- vs data-parallel, torch_blue + DDP
#   bash benchmarks/gpu_round.sh ours     # the pyro_sp rows again, with raw torch and NumPyro (fp32 and TF32)
#   bash benchmarks/gpu_round.sh whole    # compiled step as one graph vs split at the gradient buckets
#   bash benchmarks/gpu_round.sh memory   # the largest N on one GPU
# Needs the wheels of pyro-ppl, pyro-api and torch-blue in .whl/ on a machine without internet.
# Results (JSON lines and JSON) go to $OUT (default ./bench-out).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
mkdir -p "$OUT/r"
R=$OUT/r
BENCH="python3 -m pyro_sp.cli bench"
case "$1" in
ours)  # the pyro_sp rows of "single", with the fp32/TF32 peers they are compared with
  (export CUDA_VISIBLE_DEVICES=0
   timeout 200 $BENCH gpu-single --model mlp --particles 8 32 64 --variants pyro fused fused_analytic --out $R/mlp_single.json
   timeout 100 $BENCH gpu-single --model mlp --particles 8 32 64 --variants fused fused_analytic --tf32 --out $R/mlp_single_tf32.json
   timeout 60 python3 benchmarks/gpu_peers.py torch --particles 8 32 64 --out $R/mlp_raw_torch.json
   JAX_DEFAULT_MATMUL_PRECISION=highest timeout 90 python3 benchmarks/gpu_peers.py numpyro --particles 8 32 64 --out $R/mlp_numpyro_fp32.json
  ) > "$R/gpu0.log" 2>&1 &
  (export CUDA_VISIBLE_DEVICES=1
   timeout 300 $BENCH gpu-single --model vit --particles 8 32 64 --variants pyro fused --out $R/vit_single.json
   timeout 150 $BENCH gpu-single --model vit --particles 8 32 64 --variants fused --tf32 --out $R/vit_single_tf32.json
  ) > "$R/gpu1.log" 2>&1 &
  wait ;;
single)
  nvidia-smi --query-gpu=name,memory.total --format=csv > "$R/gpus.csv"
  (export CUDA_VISIBLE_DEVICES=0
   timeout 300 $BENCH gpu-single --model mlp --particles 8 32 64 --variants pyro pyro_sp fused fused_analytic --out $R/mlp_single.json
   timeout 100 python3 benchmarks/torch_blue_bench.py single --model mlp --particles 8 32 64 --out $R/mlp_torch_blue.json
   timeout 60 python3 benchmarks/gpu_peers.py torch --particles 8 32 64 --out $R/mlp_raw_torch.json
   timeout 90 python3 benchmarks/gpu_peers.py numpyro --particles 8 32 64 --out $R/mlp_numpyro.json
  ) > "$R/gpu0.log" 2>&1 &
  (export CUDA_VISIBLE_DEVICES=1
   timeout 330 $BENCH gpu-single --model vit --particles 8 32 64 --variants pyro fused --out $R/vit_single.json
   timeout 90 python3 benchmarks/torch_blue_bench.py single --model vit --particles 8 32 64 --out $R/vit_torch_blue.json
   timeout 130 python3 benchmarks/numpyro_vit.py --particles 8 32 64 --out $R/vit_numpyro.json
  ) > "$R/gpu1.log" 2>&1 &
  wait ;;
scaling)
  for m in mlp vit; do
    pg="--per-gpu 8 32"; [ $m = vit ] && pg="--per-gpu 8"
    timeout 110 $BENCH gpu-scaling --nproc 1 --model $m --particles 64 $pg --variants fused --out $R/${m}_fused_1gpu.json
    timeout 110 $BENCH gpu-scaling --nproc 2 --model $m --particles 64 $pg --variants fused --out $R/${m}_fused_2gpu.json
    timeout 70 $BENCH gpu-scaling --nproc 2 --model $m --particles 64 --data-parallel --variants fused --out $R/${m}_fused_2gpu_data.json
  done > "$R/scaling.log" 2>&1
  timeout 80 python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/torch_blue_bench.py paper \
    --model mlp --per-gpu 8 32 --out $R/mlp_torch_blue_paper.json > "$R/paper.log" 2>&1 ;;
whole)  # one compiled graph (the default) against the graph split at the buckets, 1 and 2 GPUs
  (timeout 100 $BENCH gpu-scaling --nproc 1 --model mlp --per-gpu 8 32 --variants fused --out $R/mlp_whole_1gpu.json
   timeout 150 $BENCH gpu-scaling --nproc 2 --model mlp --per-gpu 8 32 --variants fused fused_split --out $R/mlp_whole_2gpu.json
   timeout 150 $BENCH gpu-scaling --nproc 2 --model vit --per-gpu 8 --variants fused --out $R/vit_whole_2gpu.json
  ) > "$R/whole.log" 2>&1 ;;
memory)  # the largest N on one GPU (MLP): doubling from --start, then bisection
  (timeout 150 $BENCH gpu-memory --model mlp --variants fused --start 512 --resolution 0.1 --out $R/mlp_memory_fused.json
   timeout 60 $BENCH gpu-memory --model mlp --variants pyro_sp --start 128 --resolution 0.1 --out $R/mlp_memory_pyro_sp.json
  ) > "$R/mem.log" 2>&1 ;;
esac
tar czf "$OUT/results_$1.tar.gz" -C "$R" .
