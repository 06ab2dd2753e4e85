#!/bin/bash
# pyro-sp bench overhead and the CPU 2-rank step, before vs after, alternating rounds.
REPO=${REPO:-$(pwd)}; OUT=$(realpath -m "${OUT:-benchmarks/out/core_refactor}"); mkdir -p "$OUT"; cd /tmp
for round in 1 2 3; do
  for v in before after; do
    PYTHONPATH=$REPO/wheels/$v python3 -m pyro_sp.cli bench overhead --rounds 3 --steps 20 \
      --out $OUT/overhead_${v}_r$round.json > /dev/null 2>&1
    PYTHONPATH=$REPO/wheels/$v python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
      -m pyro_sp.bench.cpu step --particles 32 --steps 40 --out $OUT/step_${v}_r$round.json > $OUT/step_${v}_r$round.log 2>&1
    echo "$v $round done"
  done
done
