# SPDX-License-Identifier: Apache-2.0
"""
Every tile of the regenerated-noise kernels (``pyro_sp.nn._noise_kernels``) timed on its own,
on the Bayesian MLP's layer shapes (3072-2048-2048-10, batch 256): the forward and the
input-gradient kernel, one launch per tile configuration (the autotuner's candidates,
``regenerated_noise._CUDA_TILES``, and ``--extra`` ones), with the registers, spills and shared
memory each compiles to, and the tile the autotuner keeps. CUDA events, median of 20 after 3
untimed calls. Not a test: writes JSON.

    python benchmarks/kernel_tiles.py --particles 32 --extra 256,64,32,8,2 --out tiles.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from pyro_sp.bench import write_result
from pyro_sp.bench.timing import timed
from pyro_sp.nn import regenerated_noise as rn

BATCH = 256
LAYERS = ((3072, 2048, True), (2048, 2048, False), (2048, 10, False))  # in, out, shared input


def _median_ms(fn) -> float:
    return timed(fn, warmup=3, steps=20, device=torch.device("cuda"), events=True)["step_ms_median"]


def _compiled(launch) -> dict:
    """Registers per thread, spills and shared memory of a launch's compiled kernel."""
    kernel = launch()
    meta = getattr(kernel, "metadata", None)
    return {"registers": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None),
            "shared_bytes": getattr(meta, "shared", None)}


def _chosen(launcher) -> list:
    """The tiles the autotuner kept, per key."""
    return [str(config) for config in getattr(launcher, "cache", {}).values()]


def shape_tiles(n: int, k: int, o: int, shared: bool, precision: str, tiles: dict) -> dict:
    device = torch.device("cuda")
    mod = rn.kernels(device)
    loc = torch.zeros(o, k, device=device)
    scale = torch.full((o, k), 0.01, device=device)
    seeds = rn.draw_seeds(n, device)
    x = torch.randn((BATCH, k) if shared else (n, BATCH, k), device=device)
    y = torch.empty((n, BATCH, o), device=device)
    gy = torch.randn((n, BATCH, o), device=device)
    gx = torch.empty((n, BATCH, k), device=device)
    kq, sxn = rn._cdiv(k, 4), 0 if shared else x.stride(0)
    out = {"shape": {"particles": n, "rows": BATCH, "in": k, "out": o, "shared_input": shared}, "forward": [],
           "grad_input": []}
    for bm, bo, bk, warps, stages in tiles["forward"]:
        grid = (rn._cdiv(BATCH, bm) * rn._cdiv(o, bo), n)

        def forward():
            return mod.forward_kernel[grid](x, loc, scale, seeds, y, BATCH, o, k, kq, sxn, x.stride(-2),
                                            x.stride(-1), *y.stride(), BM=bm, BO=bo, BK=bk, ROUNDS=rn.ROUNDS,
                                            PRECISION=precision, ACC=rn._accumulator(x.dtype),
                                            num_warps=warps, num_stages=stages)
        try:
            row = {"tile": [bm, bo, bk, warps, stages], **_compiled(forward), "ms": _median_ms(forward)}
        except Exception as e:  # noqa: BLE001 - a tile that does not fit is a result, not a failure
            row = {"tile": [bm, bo, bk, warps, stages], "error": f"{type(e).__name__}: {str(e)[:200]}"}
        out["forward"].append(row)
        print(k, o, "forward", row, flush=True)
    if not shared:
        for bm, bk, bo, warps, stages in tiles["grad_input"]:
            grid = (rn._cdiv(BATCH, bm) * rn._cdiv(k, bk), n)

            def grad_input():
                return mod.grad_input_kernel[grid](gy, loc, scale, seeds, gx, n, BATCH, o, k, kq, *gy.stride(),
                                                   *gx.stride(), SUM_PARTICLES=False, BM=bm, BK=bk, BO=bo,
                                                   ROUNDS=rn.ROUNDS, PRECISION=precision,
                                                   ACC=rn._accumulator(x.dtype), num_warps=warps, num_stages=stages)
            try:
                row = {"tile": [bm, bk, bo, warps, stages], **_compiled(grad_input), "ms": _median_ms(grad_input)}
            except Exception as e:  # noqa: BLE001
                row = {"tile": [bm, bk, bo, warps, stages], "error": f"{type(e).__name__}: {str(e)[:200]}"}
            out["grad_input"].append(row)
            print(k, o, "grad_input", row, flush=True)
    # the autotuner's own pick, through the operators
    xr = x.detach().requires_grad_(not shared)
    locr, scaler = loc.clone().requires_grad_(), scale.clone().requires_grad_()
    rn.noise_linear(xr, locr, scaler, seeds, shared, precision).backward(gy)
    out["autotuned"] = {"forward": _chosen(mod.forward), "grad_input": _chosen(mod.grad_input)}
    out["autotuned_ms"] = {"forward": _median_ms(lambda: rn.noise_linear(x, loc, scale, seeds, shared, precision))}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--particles", type=int, default=32)
    p.add_argument("--precision", default="tf32", choices=("tf32", "bf16", "ieee"))
    p.add_argument("--extra", nargs="*", default=[],
                   help="more tiles, each 'rows,cols,inner,warps,stages' (forward: BM,BO,BK; grad_input: BM,BK,BO)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    extra = [tuple(int(v) for v in t.split(",")) for t in args.extra]
    tiles = {kind: list(rn._CUDA_TILES[kind]) + [t for t in extra if t not in rn._CUDA_TILES[kind]]
             for kind in ("forward", "grad_input")}
    result = {"device": torch.cuda.get_device_name(), "precision": args.precision, "tiles": tiles, "layers": []}
    for k, o, shared in LAYERS:
        result["layers"].append(shape_tiles(args.particles, k, o, shared, args.precision, tiles))
        write_result(args.out, result, partial=True)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
