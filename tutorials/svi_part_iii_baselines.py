# SPDX-License-Identifier: Apache-2.0
# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # SVI Part III: score-function gradients and baselines
#
# Pyro's third SVI tutorial: when a guide's sample site cannot be
# reparameterized, `TraceGraph_ELBO` uses the score-function estimator, whose
# variance a *baseline* reduces. We reuse the coin of Part I with a Beta guide
# marked as not reparameterizable and a decaying-average baseline.
#
# pyro_sp keeps each rank's decaying average for its own particles (they are
# per-rank state, in checkpoints too) and sums the surrogate over ranks, so the
# gradient is exactly Pyro's.
#
# **What changes for pyro_sp:** the estimator line.
#
#     python tutorials/svi_part_iii_baselines.py
#     torchrun --nproc-per-node 2 tutorials/svi_part_iii_baselines.py

# %%
import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI
from pyro.optim import Adam
from torch.distributions import constraints

import pyro_sp
from _common import Clock, finish, report, say, steps, SEED

mesh = pyro_sp.init_mesh()
pyro.set_rng_seed(SEED)
data = torch.cat([torch.ones(6), torch.zeros(4)])
EXACT_MEAN = 16 / 30


def model(data):
    f = pyro.sample("latent_fairness", dist.Beta(10.0, 10.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Bernoulli(f), obs=data)


def make_guide(baseline: bool):
    infer = {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.90}} if baseline else {}

    def guide(data):
        alpha_q = pyro.param("alpha_q", torch.tensor(15.0), constraint=constraints.positive)
        beta_q = pyro.param("beta_q", torch.tensor(15.0), constraint=constraints.positive)
        # not reparameterized: TraceGraph uses the score function for this site
        pyro.sample("latent_fairness", dist.Beta(alpha_q, beta_q).has_rsample_(False), infer=infer)

    return guide


# %% [markdown]
# The one changed line: `TraceGraph_ELBO(...)` becomes `pyro_sp.DistributedTraceGraph_ELBO(...)`.
# First the spread of the gradient at the starting point, with and without
# the baseline (the baseline warms up over the first calls).

# %%
def gradient_spread(baseline: bool, calls: int) -> float:
    pyro.clear_param_store()
    elbo = pyro_sp.DistributedTraceGraph_ELBO(num_particles=4, vectorize_particles=True)  # was: TraceGraph_ELBO
    guide = make_guide(baseline)
    grads = []
    for _ in range(calls):
        elbo.loss_and_grads(model, guide, data)
        p = pyro.param("alpha_q").unconstrained()
        grads.append(p.grad.item())
        p.grad = None
    warm = grads[calls // 4 :]
    mean = sum(warm) / len(warm)
    return math.sqrt(sum((g - mean) ** 2 for g in warm) / (len(warm) - 1))


calls = steps(400, 40)
spread = {b: gradient_spread(b, calls) for b in (False, True)}
say(f"gradient std of alpha_q: {spread[False]:.3f} without, {spread[True]:.3f} with the baseline")

# %% [markdown]
# Then training with the baseline until the posterior mean is close to the exact 16/30.

# %%
pyro.clear_param_store()
elbo = pyro_sp.DistributedTraceGraph_ELBO(num_particles=4, vectorize_particles=True)  # was: TraceGraph_ELBO
svi = SVI(model, make_guide(True), Adam({"lr": 0.0005, "betas": (0.90, 0.999)}), loss=elbo)
clock = Clock()
losses, reached = [], None
num_steps = steps(6000, 300)
for step in range(num_steps):
    losses.append(svi.step(data))
    a, b = pyro.param("alpha_q").item(), pyro.param("beta_q").item()
    if reached is None and abs(a / (a + b) - EXACT_MEAN) < 0.01:
        reached = step
a, b = pyro.param("alpha_q").item(), pyro.param("beta_q").item()
mean = a / (a + b)
say(f"fairness {mean:.3f} (exact {EXACT_MEAN:.3f}); within 0.01 after {reached} steps")
report(
    "svi_part_iii_baselines",
    grad_std_without_baseline=spread[False],
    grad_std_with_baseline=spread[True],
    mean=mean,
    exact_mean=EXACT_MEAN,
    steps_to_within_0_01=reached,
    seconds=clock(),
    steps=num_steps,
)
assert spread[True] < spread[False], "the baseline did not reduce the gradient's spread"
assert abs(mean - EXACT_MEAN) < (0.02 if num_steps >= 6000 else 0.1)
finish()
