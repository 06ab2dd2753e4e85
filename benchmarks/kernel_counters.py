# SPDX-License-Identifier: Apache-2.0
"""
The hardware's own counters for the regenerated-noise forward kernel, beside the ``torch.bmm`` of the
same product with the weights stored and the noise kernel alone, on the Bayesian MLP's two large
layers (3072->2048 with the input shared by the particles, 2048->2048; batch 256, TF32). Each is
launched twice untimed, then once between ``cudaProfilerStart`` and ``cudaProfilerStop``, so that
Nsight Compute, started with ``--profile-from-start off``, measures those launches alone:

    ncu --profile-from-start off --set full --csv --page details \\
        python benchmarks/kernel_counters.py --tile 256 64 16 8 3 > ncu.csv
    python benchmarks/kernel_counters.py --summarize ncu.csv --out counters.json

``--summarize`` turns Nsight Compute's CSV into JSON: per kernel, every metric by section, and the
rules' advice. Not a test.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.kernel_tiles import LAYERS, forward_launch
from benchmarks.regenerated_check import BATCH
from pyro_sp.bench import write_result
from pyro_sp.nn import regenerated_noise as rn


def launches(n: int, tile: tuple, precision: str) -> list[tuple[str, object]]:
    """``(what, launch)`` for each large layer: the forward kernel at ``tile``, ``torch.bmm``, the noise."""
    device = torch.device("cuda")
    mod = rn.kernels(device)
    out = []
    for k, o, shared in LAYERS:
        if o < 64:  # the 2048->10 layer: too small to say anything
            continue
        loc = torch.randn(o, k, device=device) * 0.05
        scale = torch.rand(o, k, device=device) * 0.05
        seeds = rn.draw_seeds(n, device)
        x = torch.randn((BATCH, k) if shared else (n, BATCH, k), device=device)
        y = torch.empty(n, BATCH, o, device=device)
        w = torch.randn(n, o, k, device=device)
        xb = x.expand(n, BATCH, k) if shared else x
        layer = f"{k}->{o}" + (" (shared input)" if shared else "")
        out += [(f"forward_kernel {layer}, tile {tile}", forward_launch(mod, tile, x, loc, scale, seeds, y, shared,
                                                                        precision)),
                (f"torch.bmm {layer} (weights stored)", lambda xb=xb, w=w: torch.bmm(xb, w.transpose(1, 2))),
                (f"noise_kernel {layer} (the noise alone, written)",
                 lambda s=seeds, shape=(o, k): rn.weight_noise(s, shape))]
    return out


def summarize(path: str) -> dict:
    """Nsight Compute's ``--csv --page details`` output as ``{"kernels": [{name, grid, block, metrics,
    rules}]}``, in launch order."""
    with open(path) as f:
        text = f.read()
    rows = csv.DictReader(io.StringIO(text[text.index('"ID"'):]))  # after the tool's own log lines
    kernels: dict[str, dict] = {}
    for r in rows:
        k = kernels.setdefault(r["ID"], {"kernel": r["Kernel Name"][:90], "grid": r["Grid Size"],
                                         "block": r["Block Size"], "metrics": {}, "rules": {}})
        if r["Metric Name"]:  # a rule's row has none
            k["metrics"][f'{r["Section Name"]}: {r["Metric Name"]}'] = f'{r["Metric Value"]} {r["Metric Unit"]}'.strip()
        if r["Rule Description"]:
            k["rules"][r["Rule Name"]] = r["Rule Description"]
    return {"kernels": list(kernels.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--particles", type=int, default=32)
    p.add_argument("--tile", type=int, nargs=5, default=list(rn._CUDA_TILES["forward"][0]),
                   help="the forward kernel's tile: BM BO BK warps stages")
    p.add_argument("--precision", default="tf32", choices=("tf32", "bf16", "ieee"))
    p.add_argument("--summarize", default=None, help="Nsight Compute's CSV to turn into JSON (no GPU needed)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.summarize:
        result = summarize(args.summarize)
        write_result(args.out, result)
        for k in result["kernels"]:
            m = k["metrics"]
            print(k["kernel"][:40], {name: m.get(f"GPU Speed Of Light Throughput: {name}")
                                     for name in ("Duration", "Compute (SM) Throughput", "L2 Cache Throughput")})
        return 0
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    torch.backends.cuda.matmul.fp32_precision = "tf32" if args.precision == "tf32" else "ieee"
    todo = launches(args.particles, tuple(args.tile), args.precision)
    for _, launch in todo:
        launch()
        launch()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for _, launch in todo:
        launch()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print("profiled, in order:", [what for what, _ in todo])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
