# Sourced by the GPU round scripts: $OUT (default ./bench-out), the carried wheels of .whl/
# installed (a machine without internet), PYTHONPATH, and the environment every run shares.
OUT=${OUT:-bench-out}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONWARNINGS=ignore
