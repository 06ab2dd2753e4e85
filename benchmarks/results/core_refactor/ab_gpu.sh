#!/bin/bash
# MeanFieldVI's GPU step, the code before the refactor against after, alternating rounds.
set -u
REPO=$(pwd)
python3 -m pip install -q --no-deps $REPO/wheels/pyro_api-*.whl $REPO/wheels/pyro_ppl-*.whl $REPO/wheels/opt_einsum-*.whl 2>&1 | tail -1
python3 -c "import tqdm" 2>/dev/null || python3 -m pip install -q --no-deps $REPO/wheels/tqdm-*.whl
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
cd /tmp
for round in 1 2 3; do
  for v in before after; do
    PYTHONPATH=$REPO/wheels/$v timeout 200 python3 -m pyro_sp.bench.gpu single --model mlp --variants fused_eager fused \
      --particles 32 --tf32 --warmup 5 --steps 30 --out $OUT/${v}_r${round}.json 2>&1 | grep -v Warning | tail -2
    echo "== $v round $round rc=$?"
  done
done
