# SPDX-License-Identifier: Apache-2.0
"""Training: SVI at 2 ranks reaches the same posterior as one process, and the
parameters stay identical on every rank after every step."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.distributed as tdist
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import pyro_sp
from tests.models import DIM, make_data

SIGMA = 0.5
STEPS = 200
NUM_PARTICLES = 8


def regression(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([DIM]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal((x * w).sum(-1), SIGMA), obs=y)


def exact_posterior(x, y):
    """Mean and mean-field-optimal standard deviations of the conjugate posterior."""
    precision = torch.eye(DIM, dtype=x.dtype) + x.T @ x / SIGMA**2
    mean = torch.linalg.solve(precision, x.T @ y / SIGMA**2)
    return mean, precision.diagonal().rsqrt()


def train(distributed: bool):
    x, y = make_data(3, n=40)
    pyro.set_rng_seed(5)
    guide = AutoNormal(regression, init_scale=0.3)
    loss = (
        pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=NUM_PARTICLES, mesh=pyro_sp.SPMesh(sample=2))
        if distributed
        else Trace_ELBO(num_particles=NUM_PARTICLES, vectorize_particles=True)
    )
    svi = SVI(regression, guide, pyro.optim.Adam({"lr": 0.05}), loss=loss)
    max_spread = 0.0
    for _ in range(STEPS):
        svi.step(x, y)
        if distributed:
            flat = torch.cat([p.detach().reshape(-1) for _, p in sorted(pyro.get_param_store().named_parameters())])
            gathered = [torch.empty_like(flat) for _ in range(tdist.get_world_size())]
            tdist.all_gather(gathered, flat)
            max_spread = max(max_spread, max((g - flat).abs().max().item() for g in gathered))
    with torch.no_grad():
        loc = guide.locs.w.detach().clone()
        scale = guide.scales.w.detach().clone()
    return loc, scale, max_spread, exact_posterior(x, y)


def test_two_ranks_match_one_process(pools):
    results = pools(2).run(train, True)
    for loc, scale, spread, _ in results:
        assert spread == 0.0, f"parameters differed across ranks by {spread}"
        torch.testing.assert_close(loc, results[0][0], rtol=0, atol=0)
    torch.set_default_dtype(torch.float64)
    ref_loc, ref_scale, _, (post_mean, post_sd) = train(False)
    loc, scale = results[0][0], results[0][1]
    # both runs sit at the analytic optimum within Monte Carlo error of the last steps
    torch.testing.assert_close(loc, post_mean, atol=0.03, rtol=0)
    torch.testing.assert_close(ref_loc, post_mean, atol=0.03, rtol=0)
    torch.testing.assert_close(loc, ref_loc, atol=0.04, rtol=0)
    torch.testing.assert_close(scale, post_sd, rtol=0.3, atol=0)
    torch.testing.assert_close(ref_scale, post_sd, rtol=0.3, atol=0)
