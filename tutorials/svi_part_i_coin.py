# SPDX-License-Identifier: Apache-2.0
# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # SVI Part I: is the coin fair?
#
# Pyro's first SVI tutorial: a coin's fairness ``f`` has a Beta(10, 10)
# prior, we see 6 heads in 10 tosses, and a Beta guide with two positive
# parameters learns the posterior. The exact posterior is Beta(16, 14), so we
# can say how close SVI gets.
#
# **What changes for pyro_sp:** the estimator line (and `init_mesh`, which
# does nothing without torchrun). We also ask for 8 particles per step,
# vectorized: a single-particle estimator has nothing to split.
#
#     python tutorials/svi_part_i_coin.py                        # one process: Pyro's estimator
#     torchrun --nproc-per-node 2 tutorials/svi_part_i_coin.py   # 4 particles per rank

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

mesh = pyro_sp.init_mesh()  # added: the process grid (single process without torchrun)
pyro.set_rng_seed(SEED)  # the same seed on every rank
pyro.clear_param_store()

data = torch.cat([torch.ones(6), torch.zeros(4)])


def model(data):
    f = pyro.sample("latent_fairness", dist.Beta(10.0, 10.0))
    for i in range(len(data)):
        pyro.sample(f"obs_{i}", dist.Bernoulli(f), obs=data[i])


def guide(data):
    alpha_q = pyro.param("alpha_q", torch.tensor(15.0), constraint=constraints.positive)
    beta_q = pyro.param("beta_q", torch.tensor(15.0), constraint=constraints.positive)
    pyro.sample("latent_fairness", dist.Beta(alpha_q, beta_q))


# %% [markdown]
# The one changed line: `Trace_ELBO(...)` becomes `pyro_sp.DistributedTrace_ELBO(...)`.

# %%
elbo = pyro_sp.DistributedTrace_ELBO(num_particles=8, vectorize_particles=True)  # was: Trace_ELBO(...)
svi = SVI(model, guide, Adam({"lr": 0.0005, "betas": (0.90, 0.999)}), loss=elbo)

clock = Clock()
num_steps = steps(4000, 200)
losses = []
for step in range(num_steps):
    losses.append(svi.step(data))
    if step % 1000 == 0:
        say(f"step {step}: loss {losses[-1]:.3f}")
seconds = clock()

# %% [markdown]
# The learned Beta against the exact posterior Beta(16, 14).

# %%
alpha_q, beta_q = pyro.param("alpha_q").item(), pyro.param("beta_q").item()
mean = alpha_q / (alpha_q + beta_q)
std = math.sqrt(alpha_q * beta_q / ((alpha_q + beta_q) ** 2 * (alpha_q + beta_q + 1)))
exact_mean, exact_std = 16 / 30, math.sqrt(16 * 14 / (30**2 * 31))
say(f"fairness: {mean:.3f} +- {std:.3f} (exact posterior {exact_mean:.3f} +- {exact_std:.3f})")
first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
report(
    "svi_part_i_coin",
    mean=mean,
    std=std,
    exact_mean=exact_mean,
    exact_std=exact_std,
    loss_first_50=first,
    loss_last_50=last,
    seconds=seconds,
    steps=num_steps,
)
assert last < first, "the loss did not fall"
assert abs(mean - exact_mean) < (0.05 if num_steps >= 4000 else 0.1), "posterior mean off"
finish()
