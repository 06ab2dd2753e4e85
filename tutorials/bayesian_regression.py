# SPDX-License-Identifier: Apache-2.0
"""Bayesian linear regression with sampling parallelism.

Runs alone (one process: exactly Pyro's estimator) or under torchrun, where
the particles are split over the sample axis and the data over the data axis::

    python tutorials/bayesian_regression.py
    torchrun --nproc-per-node 2 tutorials/bayesian_regression.py
    torchrun --nproc-per-node 4 tutorials/bayesian_regression.py --sample 2 --data 2

The data are synthetic with a known noise level, so the exact posterior is
known in closed form; the script trains a mean-field Normal guide and prints
how close it got to the mean-field optimum (the exact posterior mean, and
standard deviations ``1 / sqrt(diag(precision))``). Only rank 0 prints.
"""

from __future__ import annotations

import argparse

import pyro
import pyro.distributions as dist
import torch
import torch.distributed as tdist
from pyro.infer import SVI
from pyro.infer.autoguide import AutoNormal
from tqdm import tqdm

import pyro_sp

NOISE = 0.5


def make_data(num_data: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_data, dim, generator=g)
    w = torch.randn(dim, generator=g)
    y = x @ w + NOISE * torch.randn(num_data, generator=g)
    return x, y


def model(x, y, num_data, idx):
    """Prior w ~ N(0, I); likelihood y_i ~ N(x_i . w, NOISE) over a plate of all data."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    with pyro.plate("data", num_data, subsample=idx):
        pyro.sample("y", dist.Normal((x * w).sum(-1), NOISE), obs=y)


def exact_mean_field_optimum(x, y):
    precision = torch.eye(x.shape[1]) + x.T @ x / NOISE**2
    mean = torch.linalg.solve(precision, x.T @ y / NOISE**2)
    return mean, precision.diagonal().rsqrt()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--particles", type=int, default=16, help="global number of particles")
    p.add_argument("--sample", type=int, default=None, help="sample axis size (default: all ranks)")
    p.add_argument("--data", type=int, default=None, help="data axis size")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--num-data", type=int, default=512)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    mesh = pyro_sp.init_mesh(sample=args.sample, data=args.data)
    master = mesh.rank == 0
    pyro.set_rng_seed(args.seed)  # same seed everywhere: pyro_sp derives per-rank streams
    x, y = make_data(args.num_data, args.dim)
    # each data group reads its own shard of the data set
    index, size = mesh.data_shard()
    idx = torch.arange(args.num_data)[index::size]
    xs, ys = x[idx], y[idx]

    guide = AutoNormal(model, init_scale=0.1)
    elbo = pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=args.particles, mesh=mesh, max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": args.lr, "lrd": 0.999}), loss=elbo)
    if master:
        print(f"{mesh}; {args.particles} particles, {mesh.particle_share(args.particles)} on rank 0")
    bar = tqdm(range(args.steps), disable=not master, desc="SVI", unit="step")
    for step in bar:
        loss = svi.step(xs, ys, args.num_data, idx)  # identical on every rank
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss:.2f}")

    mean, sd = exact_mean_field_optimum(x, y)
    loc, scale = guide.locs.w.detach(), guide.scales.w.detach()
    if master:
        print(f"final loss (negative ELBO): {loss:.3f}")
        print(f"max |posterior mean - exact|: {(loc - mean).abs().max():.4f}")
        print(f"max relative error of the posterior sd: {((scale - sd).abs() / sd).max():.3f}")
    if mesh.is_distributed:
        tdist.destroy_process_group()


if __name__ == "__main__":
    main()
