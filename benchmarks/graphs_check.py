# SPDX-License-Identifier: Apache-2.0
"""``MeanFieldVI(cuda_graphs=True)`` checked on a CUDA device against the same compiled
step without CUDA graphs: two copies of the Bayesian MLP (3072-2048-2048-10, batch 256)
from the same initial values and seed, a few Adam steps each, and the largest relative
difference of the losses and of the final parameters, for stored and regenerated weight
noise. The graphs replay the same kernels on the same random stream, so the two runs
should agree to rounding (bitwise where the kernels are deterministic). Not a test:
writes JSON.

    python benchmarks/graphs_check.py --particles 8 --out graphs_check.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from pyro_sp.bench import write_result
from pyro_sp.bench.gpu import problem
from pyro_sp.nn import BayesianModule, MeanFieldVI


def run(bnn, weight_noise: str, graphs: bool, x, y, n: int, steps: int):
    vi = MeanFieldVI(copy.deepcopy(bnn), num_particles=n, seed=0, init_scale=0.01, kl="analytic",
                     weight_noise=weight_noise, compile=True, cuda_graphs=graphs).to(x.device)
    # capturable on both sides: with graphs the update is replayed in the step's graph
    optim = torch.optim.Adam([p for p in vi.parameters() if p.requires_grad], lr=1e-3, capturable=True)
    losses = [float(vi.step(optim, x, y)) for _ in range(steps)]
    replays = vi._graphs.replays if graphs else 0
    return losses, [p.detach().clone() for p in vi.parameters()], replays


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--tiny", action="store_true", help="a small MLP (a quick check of the script)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    net, x, y = problem("mlp", args.tiny, device)
    bnn = BayesianModule(net, prior_scale="fan_in")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "particles": args.particles,
              "steps": args.steps}
    for weight_noise in ("stored", "regenerated"):
        plain, plain_params, _ = run(bnn, weight_noise, False, x, y, args.particles, args.steps)
        torch._dynamo.reset()
        graphs, graph_params, replays = run(bnn, weight_noise, True, x, y, args.particles, args.steps)
        torch._dynamo.reset()
        row = {
            "losses": plain, "losses_graphs": graphs, "steps_replayed": replays,
            "max_rel_loss_difference": max(abs(a - b) / abs(a) for a, b in zip(plain, graphs)),
            "max_rel_parameter_difference": max(float((a - b).norm() / a.norm().clamp_min(1e-30))
                                                for a, b in zip(plain_params, graph_params)),
        }
        print(weight_noise, row, flush=True)
        result[weight_noise] = row
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
