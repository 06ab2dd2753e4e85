# Record of round 9's first call (.whl/cur: HEAD 3df5ced's package; the tree: the fused weight-gradient kernel with K-major copies). Kept as run.
# (call 1) fused weight gradients, K-major (tree) vs HEAD 3df5ced (.whl/cur), per layer and step, taking turns
set -u
TREE=$PYTHONPATH
CUR=${TREE%"$PWD"}$PWD/.whl/cur
REPO=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
side_env() { if [ $1 = cur ]; then export PYTHONPATH=$CUR; else export PYTHONPATH=$TREE; fi; }
layers() {
  side_env $1
  (cd $OUT && echo "== layers $1 N=$2 $(python3 -c 'import pyro_sp; print(pyro_sp.__file__)')" &&
   timeout 150 python3 $REPO/.whl/wg_layers.py layers_$1_n$2.json $2 2>&1 | grep -v -E "Warn|warn" | tail -4)
  export PYTHONPATH=$TREE
}
step() {
  side_env $1
  (cd $OUT && echo "== steps $1 run $2 $(python3 -c 'import pyro_sp; print(pyro_sp.__file__)')" &&
   timeout 120 python3 -m pyro_sp.cli bench gpu-single --model mlp --particles 32 64 --warmup 8 --steps 40 --tf32 \
     --fused-adam --variants fused_regenerated_graphs fused_regenerated --out steps_$1_$2.json 2>&1 |
   grep -v -E "^INFO|USDT|Warn" | tail -3)
  export PYTHONPATH=$TREE
}
layers tree 32; layers cur 32
step tree 1; step cur 1; step tree 2; step cur 2
layers tree 64
(cd $REPO && timeout 100 python3 benchmarks/step_profile.py --variant fused_regenerated_graphs --particles 32 --tf32 \
   --fused-adam --out $OUT/profile_tree_n32.json 2>&1 | grep -v -E "Warn|warn" | head -16)
