# SPDX-License-Identifier: Apache-2.0
"""
What the GPU would run of a regenerated-noise kernel, without a GPU: the kernel compiled for
sm_90 by Triton's own compiler (specialized about as the JIT specializes a launch of the MLP's
large layers: unit strides as constants, the pointers and the sizes other than the particle
counts 16-divisible; a launch can differ, e.g. O = 10), its SASS disassembled with the
``cuobjdump`` that ships with Triton, and the instructions of its main loop (the longest backward
branch) counted by opcode, with the number of normals one thread draws per iteration. Also how
many tensor-core products each wait leaves running (``warp_group_dot_wait``'s ``pendings``, in
program order: 0 inside the loop means each product is waited for at once; the wait after the
loop is 0 anyway). Not a test: writes JSON.

    python benchmarks/kernel_sass.py forward_kernel --tile 256 64 16 --warps 8 --stages 3
    python benchmarks/kernel_sass.py moments_kernel --tile 32 64 --warps 4
    python benchmarks/kernel_sass.py forward_kernel --module old_noise_kernels.py --tile 128 128 32

``--module``: another version of ``pyro_sp/nn/_noise_kernels.py`` (``git show REV:path > file``).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: each kernel's tile constants, in the order --tile gives them
TILES = {"forward_kernel": ("BM", "BO", "BK"), "grad_input_kernel": ("BM", "BK", "BO"),
         "weight_grad_kernel": ("BO", "BK"), "moments_kernel": ("BO", "BK"), "noise_kernel": ("BO", "BK")}
POINTERS = {"x": "*fp32", "loc": "*fp32", "scale": "*fp32", "y": "*fp32", "gy": "*fp32", "gx": "*fp32",
            "p": "*fp32", "gloc": "*fp32", "gscale": "*fp32", "out": "*fp32", "m1": "*fp32", "m2": "*fp32",
            "seeds": "*i64"}
UNIT_STRIDES = ("sxk", "syo", "sgo")
#: the noise tile's sides in every kernel: a thread draws (BO * BK) / threads normals per loop iteration
NOISE_TILE = ("BO", "BK")
_ADDRESS = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)")
_BRANCH = re.compile(r"BRA (0x[0-9a-f]+)")


def _module(path: str | None):
    if path is None:
        from pyro_sp.nn import regenerated_noise as rn

        return rn.kernel_module(interpret=False)
    spec = importlib.util.spec_from_file_location("noise_kernels_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_kernel(module, name: str, tile: list[int], warps: int, stages: int, precision: str, extra: dict):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(module, name)
    names = list(kernel.arg_names)
    constants = {**dict(zip(TILES[name], tile)), "ROUNDS": 10, "ACC": tl.float32, "PRECISION": precision, **extra}
    constants.update({n: 1 for n in UNIT_STRIDES})
    constants = {n: v for n, v in constants.items() if n in names}
    signature = {n: "constexpr" if n in constants else POINTERS.get(n, "i32") for n in names}
    divisible = [n for n in names if signature[n] != "constexpr" and n not in ("N", "C", "first")]
    source = ASTSource(kernel, signature, constexprs={(names.index(n),): v for n, v in constants.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages}), constants


def sass(compiled) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def loop_counts(text: str) -> tuple[int, collections.Counter]:
    """The instructions of the longest loop (the backward branch spanning the most code), by opcode."""
    lines = [(int(m.group(1), 16), m.group(3), line) for line in text.splitlines() if (m := _ADDRESS.match(line))]
    loops = [(address, int(b.group(1), 16)) for address, _, line in lines
             if (b := _BRANCH.search(line)) and int(b.group(1), 16) < address]
    if not loops:
        return 0, collections.Counter()
    end, start = max(loops, key=lambda loop: loop[0] - loop[1])
    ops = collections.Counter(op for address, op, _ in lines if start <= address <= end)
    return sum(ops.values()), ops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kernel", choices=sorted(TILES))
    p.add_argument("--tile", type=int, nargs="+", required=True, help="the kernel's tile constants, in TILES order")
    p.add_argument("--warps", type=int, default=8)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--precision", default="tf32", choices=("tf32", "bf16", "ieee"))
    p.add_argument("--module", default=None, help="another version of _noise_kernels.py (default: this tree's)")
    p.add_argument("--masked", action="store_true",
                   help="the loop with masks (EVEN off: a tile that does not divide the tensors; the MLP's large "
                        "layers divide theirs)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if len(args.tile) != len(TILES[args.kernel]):
        p.error(f"expected {len(TILES[args.kernel])} tile numbers {TILES[args.kernel]} for {args.kernel}, "
                f"got {args.tile}")
    extra = {"SUM_PARTICLES": False} if args.kernel == "grad_input_kernel" else {}
    if args.kernel == "weight_grad_kernel":
        extra = {"ACCUMULATE": True}
    extra["EVEN"] = not args.masked
    compiled, constants = compile_kernel(_module(args.module), args.kernel, args.tile, args.warps, args.stages,
                                         args.precision, extra)
    total, ops = loop_counts(sass(compiled))
    rows, cols = (constants[c] for c in NOISE_TILE)
    normals = rows * cols / (32 * args.warps)
    ttgir = compiled.asm.get("ttgir", "")
    import triton

    result = {"kernel": args.kernel, "module": args.module or "pyro_sp/nn/_noise_kernels.py",
              "triton": triton.__version__, "target": "sm_90",
              "tile": dict(zip(TILES[args.kernel], args.tile)), "warps": args.warps, "stages": args.stages,
              "precision": args.precision, "masked": args.masked, "shared_bytes": compiled.metadata.shared,
              "loop_instructions": total, "normals_per_thread_per_iteration": normals,
              "instructions_per_normal": round(total / normals, 1) if normals else None,
              "product_waits_pendings": re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", ttgir),
              "loop_opcodes": dict(ops.most_common())}
    print({k: v for k, v in result.items() if k != "loop_opcodes"})
    if args.out:
        from pyro_sp.bench import write_result

        write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
