# SPDX-License-Identifier: Apache-2.0
"""Real particle noise: the distributed gradient is unbiased for the analytic
ELBO gradient, and its variance is that of N particles (not N / world)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_sp

X = torch.tensor([0.5, 1.5, -0.3, 2.0, 0.8])
GUIDE_SCALE = 0.7
M0 = 0.4
REPEATS = 400


def conjugate_model(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def conjugate_guide(x):
    m = pyro.param("m", torch.tensor(M0))
    pyro.sample("z", dist.Normal(m, GUIDE_SCALE))


def analytic():
    """Per-particle gradient of the loss wrt m: (1 + n) z - sum(x) with z = m + s eps."""
    n = len(X)
    return (1 + n) * M0 - X.sum().item(), ((1 + n) * GUIDE_SCALE) ** 2


def gradient_estimates(num_particles: int, sample: int, repeats: int):
    mesh = pyro_sp.SPMesh(sample=sample)
    x = X.to(torch.get_default_dtype())
    elbo = pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=num_particles, mesh=mesh)
    out = []
    for _ in range(repeats):
        elbo.loss_and_grads(conjugate_model, conjugate_guide, x)
        m = pyro.param("m").unconstrained()
        out.append(m.grad.item())
        m.grad = None
    return out


@pytest.mark.parametrize("world,num_particles", [(2, 8), (3, 7)])
def test_unbiased_with_single_process_variance(pools, world, num_particles):
    per_rank = pools(world).run(gradient_estimates, num_particles, world, REPEATS)
    assert all(r == per_rank[0] for r in per_rank), "ranks returned different gradients"
    g = torch.tensor(per_rank[0], dtype=torch.float64)
    mean, var_particle = analytic()
    var_n = var_particle / num_particles
    se = (var_n / REPEATS) ** 0.5
    assert abs(g.mean().item() - mean) < 4 * se, (g.mean().item(), mean, se)
    ratio = g.var().item() / var_n
    # sd of the ratio is sqrt(2 / REPEATS) = 0.07; N / world particles would give ratio = world
    assert 0.75 < ratio < 1.3, f"variance ratio to the N-particle variance: {ratio:.3f}"


# ---- nonlinear and score-function estimators: distributed vs single process ----------
def _estimates(name: str, world: int, repeats: int, num_particles: int):
    from tests.test_estimators import tg_guide, tg_model

    mesh = pyro_sp.SPMesh(sample=world) if world else None
    x = X.to(torch.get_default_dtype())
    if name == "renyi":
        kwargs, cls, fns, param = {"alpha": 0.0}, "RenyiELBO", (conjugate_model, conjugate_guide), "m"
    else:
        kwargs, cls, fns, param = {}, "TraceGraph_ELBO", (tg_model, tg_guide), "p"
    if world:
        elbo = getattr(pyro_sp, "Distributed" + cls)(num_particles=num_particles, mesh=mesh, **{"vectorize_particles": True, **kwargs})
    else:
        pyro.set_rng_seed(8)
        elbo = getattr(pyro.infer, cls)(num_particles=num_particles, vectorize_particles=True, **kwargs)
    out = []
    for _ in range(repeats):
        elbo.loss_and_grads(*fns, x)
        p = pyro.param(param).unconstrained()
        out.append(p.grad.item())
        p.grad = None
    return out


@pytest.mark.parametrize("name", ["renyi", "tracegraph"])
def test_matches_single_process_statistically(pools, name):
    num_particles, repeats = 6, 300
    per_rank = pools(2).run(_estimates, name, 2, repeats, num_particles)
    assert per_rank[0] == per_rank[1]
    d = torch.tensor(per_rank[0], dtype=torch.float64)
    torch.set_default_dtype(torch.float64)
    s = torch.tensor(_estimates(name, 0, repeats, num_particles), dtype=torch.float64)
    se = (d.var() / repeats + s.var() / repeats).sqrt()
    assert (d.mean() - s.mean()).abs() < 4 * se, (d.mean(), s.mean(), se)
    ratio = (d.var() / s.var()).item()
    # sd of the ratio is about 0.12; half the particles would double the variance
    assert 0.65 < ratio < 1.5, f"variance ratio distributed / single process: {ratio:.3f}"
