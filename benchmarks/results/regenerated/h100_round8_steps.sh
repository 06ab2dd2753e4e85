# Record of the command behind h100_round8_steps_*.json (round 8), run from the repository root after
# benchmarks/gpu_env.sh, with round 7's package (0d15b65) unpacked at .whl/head. Kept as run.
# step times: head (0d15b65) vs tree (EVEN) at chunk 256 MiB vs tree at 1 GiB, taking turns, from $OUT
set -u
TREE=$PYTHONPATH
HEADP=${TREE%"$PWD"}$PWD/.whl/head
REPO=$PWD
step() {  # side run
  local side=$1 i=$2
  if [ $side = head ]; then export PYTHONPATH=$HEADP; else export PYTHONPATH=$TREE; fi
  CH=$([ $side = tree1g ] && echo 1073741824 || echo 268435456)
  (cd $OUT && echo "== $side run $i $(python3 -c 'import pyro_sp; print(pyro_sp.__file__)') chunk $CH" &&
  timeout 110 python3 -c "
import sys; import pyro_sp.nn.regenerated_noise as rn; rn.CHUNK_BYTES=$CH
from pyro_sp.cli import main; sys.exit(main(['bench','gpu-single','--model','mlp','--particles','32','64','--warmup','8','--steps','40','--tf32','--fused-adam','--variants','fused_regenerated_graphs','fused_regenerated','--out','steps_${side}_$i.json']))" 2>&1 | grep -v -E "^INFO|USDT|Warn" | tail -3)
  export PYTHONPATH=$TREE
}
step head 1; step tree 1; step tree1g 1; step head 2; step tree 2
timeout 110 python3 .whl/variants.py $OUT/variants.json base,even,A 2>&1 | grep -v Warning | tail -6
