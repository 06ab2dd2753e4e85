# Record of round 9's second call (tree: operands read in place; .whl/early: the same, noise drawn at a particle's first chunk; .whl/kmaj: call 1's tree; .whl/cur: HEAD 3df5ced). Kept as run.
# (call 2) fused weight gradients, operands read in place (tree) vs K-major copies (.whl/kmaj) vs HEAD (.whl/cur)
set -u
TREE=$PYTHONPATH
PRE=${TREE%"$PWD"}
REPO=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
side_env() { case $1 in cur) export PYTHONPATH=$PRE$PWD/.whl/cur;; kmaj) export PYTHONPATH=$PRE$PWD/.whl/kmaj;; early) export PYTHONPATH=$PRE$PWD/.whl/early;; *) export PYTHONPATH=$TREE;; esac; }
layers() {
  side_env $1
  (cd $OUT && echo "== layers $1 N=$2 $(python3 -c 'import pyro_sp; print(pyro_sp.__file__)')" &&
   timeout 150 python3 $REPO/.whl/wg_layers.py layers_$1_n$2.json $2 2>&1 | grep -v -E "Warn|warn" | tail -4)
  export PYTHONPATH=$TREE
}
b2b() {
  side_env $1
  (cd $OUT && echo "== b2b $1 run $2" && timeout 150 python3 $REPO/.whl/b2b.py b2b_$1_$2.json 32,64 2>&1 | grep -v -E "Warn|warn|INFO" | tail -2)
  export PYTHONPATH=$TREE
}
layers tree 32; layers cur 32; layers early 32; layers kmaj 32
b2b tree 1; b2b cur 1; b2b tree 2; b2b cur 2
(cd $REPO && timeout 90 python3 benchmarks/step_profile.py --variant fused_regenerated_graphs --particles 32 --tf32 \
   --fused-adam --out $OUT/profile_tree_n32.json 2>&1 | grep -v -E "Warn|warn" | head -14)
layers tree 64
