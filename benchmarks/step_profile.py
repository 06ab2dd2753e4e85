# SPDX-License-Identifier: Apache-2.0
"""Where the time of one ``gpu-single`` step goes, kernel by kernel: the variant's
step (:func:`pyro_sp.bench.gpu.make_step`, the same step the benchmark times) run
``--warmup`` times, then ``--steps`` steps under ``torch.profiler``; the device time
per step of every kernel name (summed over its launches), the largest first, and
their sum beside the step's time. Not a test: writes JSON.

    python benchmarks/step_profile.py --variant fused_regenerated --particles 32 --tf32 --out profile.json
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch.profiler import ProfilerActivity, profile

from pyro_sp.bench import write_result
from pyro_sp.bench.gpu import make_step, problem
from pyro_sp.bench.timing import timed


def kernel_times(prof, steps: int) -> list[dict]:
    """``[{"kernel", "ms_per_step", "launches_per_step"}]``, the largest first, from the
    profiler's device events (each kernel launch is one event)."""
    ms, launches = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            ms[event.name] += event.device_time / 1e3 / steps
            launches[event.name] += 1
    return [{"kernel": name[:160], "ms_per_step": ms[name], "launches_per_step": launches[name] / steps}
            for name in sorted(ms, key=ms.get, reverse=True)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp", choices=("mlp", "vit"))
    p.add_argument("--variant", default="fused_regenerated")
    p.add_argument("--particles", type=int, default=32)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tf32", action="store_true")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--fused-adam", action="store_true", help="torch.optim.Adam(fused=True)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    device = torch.device("cuda")
    net, x, y = problem(args.model, False, device)
    step = make_step(args.variant, net, x, y, args.particles, fused_adam=args.fused_adam)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "variant": args.variant,
              "model": args.model, "particles": args.particles, "tf32": args.tf32,
              "fused_adam": args.fused_adam,
              "timed": timed(step, warmup=args.warmup, steps=20, device=device, events=True)}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    kernels = kernel_times(prof, args.steps)
    result["device_ms_per_step"] = sum(k["ms_per_step"] for k in kernels)
    result["kernels"] = kernels[: args.top]
    print(f"{args.variant} N={args.particles}: step {result['timed']['step_ms_median']:.2f} ms, "
          f"kernels {result['device_ms_per_step']:.2f} ms", flush=True)
    for k in kernels[:12]:
        print(f"  {k['ms_per_step']:7.3f} ms  x{k['launches_per_step']:g}  {k['kernel'][:100]}")
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
