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

import itertools

import torch

from benchmarks.regenerated_check import BATCH, SIZES, median_ms
from pyro_sp.bench import write_result
from pyro_sp.nn import regenerated_noise as rn

#: the MLP's layers (in, out, shared input): the first one's input is the data, shared by the particles
LAYERS = [(k, o, i == 0) for i, (k, o) in enumerate(itertools.pairwise(SIZES))]


def _compiled(launch) -> dict:
    """Registers per thread, spills and shared memory of a launch's compiled kernel."""
    kernel = launch()
    meta = getattr(kernel, "metadata", None)
    return {"registers": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None),
            "shared_bytes": getattr(meta, "shared", None)}


def _chosen(launcher) -> dict:
    """The tiles the autotuner kept so far, by key (the shapes' sizes: the layers timed before this one
    are there too)."""
    return {str(key): str(config) for key, config in getattr(launcher, "cache", {}).items()}


def forward_launch(mod, tile, x, loc, scale, seeds, y, shared: bool, precision: str):
    """One launch of the forward kernel with ``tile`` ``(BM, BO, BK, warps, stages)``, as
    :func:`~pyro_sp.nn.regenerated_noise.noise_linear` launches it: a function of no arguments."""
    bm, bo, bk, warps, stages = tile
    (o, k), n, m = loc.shape, seeds.shape[0], x.shape[-2]
    grid = (n * rn._cdiv(m, bm) * rn._cdiv(o, bo),)  # the particles fastest
    even = rn.even("forward", {"M": m, "O": o, "K": k, "BM": bm, "BO": bo, "BK": bk})
    return lambda: mod.forward_kernel[grid](
        x, loc, scale, seeds, y, n, m, o, k, rn._cdiv(k, 4), 0 if shared else x.stride(0), x.stride(-2), x.stride(-1),
        *y.stride(), BM=bm, BO=bo, BK=bk, ROUNDS=rn.ROUNDS, PRECISION=precision, ACC=rn._accumulator(x.dtype),
        EVEN=even, num_warps=warps, num_stages=stages)


def grad_input_launch(mod, tile, gy, loc, scale, seeds, gx, precision: str):
    """One launch of the input-gradient kernel (an input per particle) with ``tile``
    ``(BM, BK, BO, warps, stages)``, as the operator's backward launches it."""
    bm, bk, bo, warps, stages = tile
    (o, k), n, m = loc.shape, seeds.shape[0], gy.shape[-2]
    grid = (n * rn._cdiv(m, bm) * rn._cdiv(k, bk),)  # the particles fastest
    even = rn.even("grad_input", {"M": m, "O": o, "K": k, "BM": bm, "BO": bo, "BK": bk})
    return lambda: mod.grad_input_kernel[grid](
        gy, loc, scale, seeds, gx, n, m, o, k, rn._cdiv(k, 4), *gy.stride(), *gx.stride(), SUM_PARTICLES=False,
        BM=bm, BK=bk, BO=bo, ROUNDS=rn.ROUNDS, PRECISION=precision, ACC=rn._accumulator(gy.dtype),
        EVEN=even, num_warps=warps, num_stages=stages)


def _row(tile, launch) -> dict:
    try:
        return {"tile": list(tile), **_compiled(launch), "ms": median_ms(launch)}
    except Exception as e:  # noqa: BLE001 - a tile that does not fit is a result, not a failure
        return {"tile": list(tile), "error": f"{type(e).__name__}: {str(e)[:200]}"}


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
    out = {"shape": {"particles": n, "rows": BATCH, "in": k, "out": o, "shared_input": shared}, "forward": [],
           "grad_input": []}
    for tile in tiles["forward"]:
        out["forward"].append(_row(tile, forward_launch(mod, tile, x, loc, scale, seeds, y, shared, precision)))
        print(k, o, "forward", out["forward"][-1], flush=True)
    if not shared:
        for tile in tiles["grad_input"]:
            out["grad_input"].append(_row(tile, grad_input_launch(mod, tile, gy, loc, scale, seeds, gx, precision)))
            print(k, o, "grad_input", out["grad_input"][-1], flush=True)
    # the autotuner's own pick, through the operators
    xr = x.detach().requires_grad_(not shared)
    locr, scaler = loc.clone().requires_grad_(), scale.clone().requires_grad_()
    rn.noise_linear(xr, locr, scaler, seeds, shared, precision).backward(gy)
    out["autotuned"] = {"forward": _chosen(mod.forward), "grad_input": _chosen(mod.grad_input)}
    out["autotuned_ms"] = {"forward": median_ms(lambda: rn.noise_linear(x, loc, scale, seeds, shared, precision))}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--particles", type=int, default=32)
    p.add_argument("--precision", default="tf32", choices=("tf32", "bf16", "ieee"))
    p.add_argument("--extra", nargs="*", default=[],
                   help="more tiles, each 'rows,cols,inner,warps,stages' (forward: BM,BO,BK; grad_input: BM,BK,BO)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    extra = [tuple(int(v) for v in t.split(",")) if t.replace(",", "").isdigit() else None for t in args.extra]
    if any(t is None or len(t) != 5 for t in extra):
        p.error(f"expected each --extra tile as 5 numbers 'rows,cols,inner,warps,stages', got {args.extra}")
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
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
