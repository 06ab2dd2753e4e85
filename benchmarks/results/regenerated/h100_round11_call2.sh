# round 11, call 2: NumPyro; this tree's graph step against 8b800bb's, taking turns; where the step's time goes
set -uo pipefail
source benchmarks/gpu_env.sh
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
BASE=$PWD/.whl/base; OUT=$(cd "$OUT" && pwd)
timeout 60 python3 -m pytest -q -p no:cacheprovider -p no:logging --tb=short tests/test_fit_on_cuda.py 2>&1 | grep -v "^DEBUG" | tail -8 | tee "$OUT/test_fit_on_cuda.log"
timeout 100 python3 benchmarks/gpu_peers.py numpyro --particles 32 64 --warmup 6 --steps 20 \
  --out "$OUT/numpyro.json" 2>&1 | tail -3
for i in 1; do
echo "== base $i"
(cd $BASE && PYTHONPATH=/tmp/site:$BASE timeout 90 python3 -m pyro_sp.cli bench gpu-single --model mlp --particles 32 64 --warmup 8 --steps 30 --tf32 --fused-adam \
  --back-to-back 5 --variants fused_regenerated_graphs --out "$OUT/ab_base_$i.json" 2>&1 | grep -v -E "^INFO|USDT|^DEBUG" | tail -4)
echo "== tree $i"
timeout 90 python3 -m pyro_sp.cli bench gpu-single --model mlp --particles 32 64 --warmup 8 --steps 30 --tf32 --fused-adam \
  --back-to-back 5 --variants fused_regenerated_graphs --out "$OUT/ab_tree_$i.json" 2>&1 | grep -v -E "^INFO|USDT|^DEBUG" | tail -4
done
