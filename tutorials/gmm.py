# SPDX-License-Identifier: Apache-2.0
# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Gaussian mixture with enumeration
#
# Pyro's GMM tutorial: five points, two components, the assignments summed
# out exactly by `TraceEnum_ELBO`, MAP estimates by `AutoDelta`, and the best
# of many random initialisations (the random part: which data points start as
# the component locations). Its data are five numbers, so nothing to replace.
#
# Random restarts only work if `pyro.set_rng_seed(seed)` decides the start:
# pyro_sp's rank 0 creates the parameters from the user's RNG exactly as Pyro
# does and broadcasts them, so every seed gives Pyro's start.
#
# The tutorial plots gradient norms with tensor hooks; under pyro_sp a hook
# sees its rank's share of the gradient, so here the norms are read from
# `.grad` after the estimator's reduction (the step SVI runs, written out).
#
# This model has no sampled latent left (AutoDelta, exact enumeration), so a
# second rank has nothing to add: the point is that the swap is exact.
#
# **What changes for pyro_sp:** the estimator line.
#
#     python tutorials/gmm.py
#     torchrun --nproc-per-node 2 tutorials/gmm.py

# %%
from collections import defaultdict

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.infer.autoguide import AutoDelta
from pyro.infer.util import zero_grads

import pyro_sp
from _common import Clock, finish, report, savefig, say, steps

mesh = pyro_sp.init_mesh()
data = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])
K = 2


@config_enumerate
def model(data):
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def init_loc_fn(site):
    if site["name"] == "weights":
        return torch.ones(K) / K
    if site["name"] == "scale":
        return (data.var() / 2).sqrt()
    if site["name"] == "locs":  # two data points, drawn from the global RNG
        return data[torch.multinomial(torch.ones(len(data)) / len(data), K)]
    raise ValueError(site["name"])


# %% [markdown]
# The one changed line: `TraceEnum_ELBO(max_plate_nesting=1)` becomes
# `pyro_sp.DistributedTraceEnum_ELBO(max_plate_nesting=1)`.

# %%
elbo = pyro_sp.DistributedTraceEnum_ELBO(max_plate_nesting=1)  # was: TraceEnum_ELBO(max_plate_nesting=1)
optim = pyro.optim.Adam({"lr": 0.1, "betas": [0.8, 0.99]})


def initialize(seed):
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    guide = AutoDelta(poutine.block(model, expose=["weights", "locs", "scale"]), init_loc_fn=init_loc_fn)
    return elbo.loss(model, guide, data), guide


clock = Clock()
restarts = steps(100, 8)
loss, seed = min((initialize(seed)[0], seed) for seed in range(restarts))
_, guide = initialize(seed)
say(f"seed = {seed}, initial loss = {loss:.4f}")

# %% [markdown]
# Training, recording each parameter's gradient norm from `.grad`: what
# `SVI.step` does, with the record between the gradient and the update.

# %%
gradient_norms = defaultdict(list)


def step(data):
    with poutine.trace(param_only=True) as capture:
        loss = elbo.loss_and_grads(model, guide, data)
    params = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}
    for name, p in params.items():
        gradient_norms[name].append(p.grad.norm().item())
    optim(params.values())
    zero_grads(params.values())
    return loss


losses = [step(data) for _ in range(steps(200, 50))]
map_estimates = guide(data)
weights = map_estimates["weights"].tolist()
locs = map_estimates["locs"].tolist()
scale = map_estimates["scale"].item()
say(f"weights = {weights}, locs = {locs}, scale = {scale:.3f}, final loss {losses[-1]:.3f}")

# %%
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(losses)
    a.set(xlabel="step", ylabel="loss", yscale="log", title="convergence")
    for name, norms in gradient_norms.items():
        b.plot(norms, label=name)
    b.set(xlabel="step", ylabel="gradient norm", yscale="log", title="gradient norms (from .grad)")
    b.legend()
    savefig(fig, "gmm")
except ImportError:
    say("matplotlib is not installed: no figure")

report(
    "gmm",
    best_seed=seed,
    initial_loss=loss,
    final_loss=losses[-1],
    weights=weights,
    locs=locs,
    scale=scale,
    seconds=clock(),
    restarts=restarts,
)
assert losses[-1] < losses[0], "the loss did not fall"
assert abs(max(weights) - 0.625) < 0.05, "expected weights near [0.625, 0.375]"
finish()
