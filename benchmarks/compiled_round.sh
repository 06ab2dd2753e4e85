#!/usr/bin/env bash
# GPU measurements of BENCHMARKS.md, one phase per call on one GPU:
#   bash benchmarks/compiled_round.sh compiled   # "The compiled general path"
#   bash benchmarks/compiled_round.sh layers     # MeanFieldVI's layer estimators (TF32)
#   bash benchmarks/compiled_round.sh short      # the main rows of both, in one call under 5 minutes
#   bash benchmarks/compiled_round.sh regenerated  # MeanFieldVI with regenerated weight noise and with
#                                                  # CUDA graphs (TF32, fused Adam) beside raw torch.compile
#                                                  # and the bare products; the ViT; bf16; the graphs' check;
#                                                  # the kernels' device check and times
#   bash benchmarks/compiled_round.sh profile      # where a step's time goes, kernel by kernel (profiler)
#   bash benchmarks/compiled_round.sh graphs_check # CUDA graphs against the step without them
#   bash benchmarks/compiled_round.sh graph_tests  # tests/test_cuda_graphs.py on the GPU
#   bash benchmarks/compiled_round.sh regenerated_peers  # raw torch.compile (with and without
#                                                  # torch.utils.checkpoint), the bare products, bf16, ViT
#   bash benchmarks/compiled_round.sh tiles        # each tile of the noise kernels alone (kernel_tiles.py)
#   bash benchmarks/compiled_round.sh counters     # the forward kernel's hardware counters beside bmm and the
#                                                  # noise alone (Nsight Compute; kernel_counters.py)
#   BASE=.whl/base bash benchmarks/compiled_round.sh ab  # this tree's regenerated step against another
#       version's package, two runs each, taking turns on one machine, each run printing the package it
#       loaded (runs differ by up to 1 ms: compare within one call). Make the other version with, e.g.,
#       mkdir -p .whl/base && git archive REV pyro_sp | tar -x -C .whl/base   (REV: the version to
#       compare with, e.g. 0d98caf for round 6's kernels; carry .whl)
# Needs the wheels of pyro-ppl and pyro-api in .whl/ on a machine without internet.
# Results (JSON) go to $OUT (default ./bench-out).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
BENCH="python3 -m pyro_sp.cli bench"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "$1" in
compiled)
timeout 330 $BENCH gpu-single --model mlp --particles 8 32 64 --warmup 6 --steps 20 \
  --variants pyro pyro_sp_compiled pyro_sp_compiled_graphs pyro_sp_compiled_grouped pyro_sp_compiled_native fused \
  --out "$OUT/gpu_single_fp32.json" 2>&1 | grep -v -E "^INFO|USDT"
timeout 240 $BENCH compiled --device cuda --programs small gmm vae \
  --variants pyro pyro_jit pyro_grouped pyro_sp_compiled pyro_sp_compiled_graphs pyro_sp_compiled_grouped \
  --out "$OUT/compiled_fp32.json" 2>&1 | grep -v -E "^INFO|USDT"
;;
layers)
timeout 280 $BENCH gpu-single --model mlp --particles 8 32 64 --warmup 6 --steps 20 --tf32 \
  --variants fused fused_analytic fused_bf16 fused_local_reparam fused_flipout --out "$OUT/layers_mlp_tf32.json" 2>&1 | grep -v -E "^INFO|USDT"
timeout 250 $BENCH gpu-single --model vit --particles 8 32 --warmup 6 --steps 20 --tf32 \
  --variants fused_analytic fused_flipout --out "$OUT/layers_vit_tf32.json" 2>&1 | grep -v -E "^INFO|USDT"
;;
short)
timeout 200 $BENCH gpu-single --model mlp --particles 8 32 64 --warmup 6 --steps 20 \
  --variants pyro pyro_sp_compiled_graphs pyro_sp_compiled_grouped fused \
  --out "$OUT/gpu_single_fp32.json" 2>&1 | grep -v -E "^INFO|USDT" | tee "$OUT/gpu_single.log"
timeout 90 $BENCH compiled --device cuda --programs small gmm vae \
  --variants pyro pyro_jit pyro_sp_compiled_grouped \
  --out "$OUT/compiled_fp32.json" 2>&1 | grep -v -E "^INFO|USDT" | tee "$OUT/compiled.log"
;;
regenerated)
timeout 200 $BENCH gpu-single --model mlp --particles 32 64 8 --warmup 6 --steps 20 --tf32 --fused-adam \
  --back-to-back 5 --variants fused_analytic fused_analytic_graphs fused_regenerated fused_regenerated_graphs \
  fused_regenerated_bf16_graphs --out "$OUT/regenerated_mlp_tf32.json" 2>&1 | grep -v -E "^INFO|USDT" | tee "$OUT/regenerated_mlp.log"
timeout 120 python3 benchmarks/gpu_peers.py torch --tf32 --gemm --bf16-noise --fused-adam --particles 32 64 --warmup 6 \
  --steps 20 --back-to-back 5 --out "$OUT/raw_torch_tf32.json" 2>&1 | tail -2
timeout 130 $BENCH gpu-single --model vit --particles 8 32 --warmup 4 --steps 10 --tf32 --fused-adam \
  --variants fused_analytic fused_regenerated \
  --out "$OUT/regenerated_vit_tf32.json" 2>&1 | grep -v -E "^INFO|USDT" | tee "$OUT/regenerated_vit.log"
timeout 70 $BENCH gpu-single --model mlp --particles 32 64 --warmup 6 --steps 20 --tf32 --fused-adam \
  --variants fused_bf16 fused_regenerated_bf16 \
  --out "$OUT/regenerated_bf16_mlp.json" 2>&1 | grep -v -E "^INFO|USDT" | tee "$OUT/regenerated_bf16.log"
timeout 80 python3 benchmarks/graphs_check.py --particles 8 --steps 6 --out "$OUT/graphs_check.json" \
  2>&1 | tee "$OUT/graphs_check.log" | tail -2
timeout 80 python3 benchmarks/regenerated_check.py --particles 32 --chunk-mib 32 64 1024 \
  --out "$OUT/regenerated_check.json" 2>&1 | tee "$OUT/regenerated_check.log" | cut -c1-200
;;
profile)
for v in fused_regenerated_graphs fused_regenerated fused_analytic; do
  timeout 80 python3 benchmarks/step_profile.py --variant $v --particles 32 --tf32 --fused-adam \
    --out "$OUT/profile_$v.json" 2>&1 | grep -v -E "^INFO|USDT" | tee "$OUT/profile_$v.log"
done
;;
graphs_check)
timeout 80 python3 benchmarks/graphs_check.py --particles 8 --steps 6 --out "$OUT/graphs_check.json" \
  2>&1 | tee "$OUT/graphs_check.log" | tail -3
;;
graph_tests)
timeout 300 python3 -m pytest -q -p no:cacheprovider -p no:logging --tb=short tests/test_cuda_graphs.py 2>&1 \
  | grep -v "^DEBUG" | tail -20 | tee "$OUT/test_cuda_graphs.log"
;;
regenerated_peers)
timeout 150 python3 benchmarks/gpu_peers.py torch --tf32 --gemm --checkpoint --particles 8 32 64 --warmup 6 \
  --steps 20 --out "$OUT/raw_torch_tf32.json" 2>&1 | tail -3
timeout 200 $BENCH gpu-single --model mlp --particles 8 32 64 --warmup 6 --steps 20 --tf32 \
  --variants fused_analytic fused_bf16 fused_regenerated_bf16 \
  --out "$OUT/regenerated_bf16_mlp.json" 2>&1 | grep -v -E "^INFO|USDT"
timeout 200 $BENCH gpu-single --model vit --particles 8 32 --warmup 4 --steps 10 --tf32 \
  --variants fused_analytic fused_regenerated --out "$OUT/regenerated_vit_tf32.json" 2>&1 | grep -v -E "^INFO|USDT"
;;
tiles)
timeout 200 python3 benchmarks/kernel_tiles.py --particles 32 --out "$OUT/tiles.json" 2>&1 | tee "$OUT/tiles.log" | cut -c1-160
;;
counters)
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
timeout 200 "$NCU" --profile-from-start off --set full --csv --page details python3 benchmarks/kernel_counters.py \
  > "$OUT/counters.csv" 2> "$OUT/counters.err"; tail -2 "$OUT/counters.err"
python3 benchmarks/kernel_counters.py --summarize "$OUT/counters.csv" --out "$OUT/counters.json"
;;
ab)
[ -d "${BASE:-}/pyro_sp" ] || { echo "ab: expected BASE=<folder holding another version's pyro_sp>, got '${BASE:-}'"; exit 2; }
TREE=$PYTHONPATH
BASE_PATH=${TREE%"$PWD"}$(cd "$BASE" && pwd)  # the same path with the other version in the tree's place
OUT_DIR=$(cd "$OUT" && pwd)
# run from $OUT_DIR: run from the tree, `python -m` puts the tree's pyro_sp before PYTHONPATH on both sides
for i in 1 2; do for side in base tree; do
  if [ $side = base ]; then export PYTHONPATH=$BASE_PATH; else export PYTHONPATH=$TREE; fi
  (cd "$OUT_DIR" && echo "== $side, run $i: $(python3 -c 'import pyro_sp; print(pyro_sp.__file__)')" &&
   timeout 200 $BENCH gpu-single --model mlp --particles 32 64 --warmup 8 --steps 40 --tf32 --fused-adam \
     --variants fused_regenerated_graphs fused_regenerated --out "ab_${side}_$i.json" 2>&1 | grep -v -E "^INFO|USDT" | tail -3)
done; done
;;
esac
