# SPDX-License-Identifier: Apache-2.0
# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # SVI with a normalizing-flow guide (and AutoNormal for comparison)
#
# Pyro's "SVI with a normalizing flow guide" tutorial: 64 latent points
# `z = (mu_1, mu_2, r)` with a standard normal prior each produce 5
# two-dimensional observations from a narrow Gaussian around `mu` whose
# correlation is `tanh(r)`. The posterior of `r` given 5 points is skewed and
# heavy-tailed, which a Gaussian guide cannot follow. The tutorial's
# observations are simulated from the model, and so are ours.
#
# Two guides are trained with 16 vectorized particles per step:
#
# * an amortized flow: a conditional spline autoregressive flow (Pyro's own
#   `pyro.distributions.transforms`; the tutorial uses the Zuko library)
#   maps the 5 observations of a point to its posterior;
# * `AutoNormal`, a mean-field Gaussian per latent point.
#
# Both are scored by the ELBO with 1 024 particles, split over the sample
# axis. Because `-ELBO = -log p(x) + KL(q || p(z | x))` and `log p(x)` is the
# same for both, the difference of the two scores is the difference of the
# guides' KL divergences from the true posterior.
#
# **What changes for pyro_sp:** the estimator line and `init_mesh`; the
# posterior samples come from `pyro_sp.DistributedPredictive`.
#
#     python tutorials/flow_guide.py
#     torchrun --nproc-per-node 2 tutorials/flow_guide.py

# %%
import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.infer import SVI
from pyro.infer.autoguide import AutoNormal
from pyro.optim import ClippedAdam

import pyro_sp
from _common import Clock, finish, report, savefig, say, steps, SEED

mesh = pyro_sp.init_mesh()  # added
pyro.set_rng_seed(SEED)  # the same seed on every rank: the same simulated data

prior = dist.Normal(torch.zeros(3), torch.ones(3)).to_event(1)


def likelihood(z):
    mu, rho = z[..., :2], z[..., 2].tanh() * 0.99
    one = torch.ones_like(rho)
    cov = 1e-2 * torch.stack([one, rho, rho, one], -1).unflatten(-1, (2, 2))
    return dist.MultivariateNormal(mu, cov)


def model(x):
    with pyro.plate("data", x.shape[1]):
        z = pyro.sample("z", prior)
        with pyro.plate("obs", 5):
            pyro.sample("x", likelihood(z), obs=x)


z_star = prior.sample((64,))
x_star = likelihood(z_star).sample((5,))  # (5 observations, 64 points, 2)

# %% [markdown]
# The flow guide: the context of point `i` is its 5 observations, flattened.

# %%
flow = T.conditional_spline_autoregressive(3, context_dim=10, hidden_dims=[128, 128], count_bins=8)


def flow_posterior(x):
    context = x.transpose(0, 1).flatten(-2)  # (points, 10)
    base = dist.Normal(torch.zeros(len(context), 3), 1.0).to_event(1)
    return dist.ConditionalTransformedDistribution(base, [flow]).condition(context)


def flow_guide(x):
    pyro.module("flow", flow)
    with pyro.plate("data", x.shape[1]):
        pyro.sample("z", flow_posterior(x))


# %% [markdown]
# Training as in the tutorial (16 particles, clipped Adam; fewer steps at a
# larger learning rate, for a CPU); the one changed
# line is the estimator.

# %%
num_steps = steps(1500, 60)
scorer = pyro_sp.DistributedTrace_ELBO(num_particles=steps(1024, 32), vectorize_particles=True, max_plate_nesting=2)
results, curves = {}, {}
for name, guide in (("flow", flow_guide), ("AutoNormal", AutoNormal(model))):
    pyro.clear_param_store()
    elbo = pyro_sp.DistributedTrace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=2)
    # was: Trace_ELBO(num_particles=16, vectorize_particles=True)
    svi = SVI(model, guide, ClippedAdam({"lr": 3e-3, "clip_norm": 10.0}), loss=elbo)
    clock, curve = Clock(), []
    for step in range(num_steps):
        curve.append(svi.step(x_star) / 64)
        if step % 1000 == 0:
            say(f"{name} step {step}: loss per point {curve[-1]:.3f}")
    seconds = clock()
    with torch.no_grad():
        score = scorer.loss(model, guide, x_star) / 64
    samples = pyro_sp.DistributedPredictive(model, guide=guide, num_samples=steps(2000, 50), return_sites=["z"])(x_star)
    results[name] = {"neg_elbo_per_point": score, "seconds": seconds, "z": samples["z"][:, 0]}
    curves[name] = curve
    say(f"{name}: {seconds:.1f} s, -ELBO per point {score:.3f}")

gap = results["AutoNormal"]["neg_elbo_per_point"] - results["flow"]["neg_elbo_per_point"]
say(f"the flow's KL from the posterior is {gap:.3f} nats per point smaller than AutoNormal's")

# %% [markdown]
# The posterior of the first point's correlation parameter `r`, from both
# guides, and the latent value that generated its data.

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
for name, curve in curves.items():
    window = max(1, len(curve) // 50)
    smooth = torch.tensor(curve).unfold(0, window, window).mean(-1)
    axes[0].plot(torch.arange(len(smooth)) * window, smooth, label=name)
axes[0].set(xlabel="step", ylabel="-ELBO per point", title="training")
axes[0].legend()
for name, r in results.items():
    axes[1].hist(r["z"][:, 2].numpy(), bins=60, density=True, histtype="step", label=name)
axes[1].axvline(float(z_star[0, 2]), color="k", linestyle=":", label="true r")
axes[1].set(xlabel="r of point 0", title="posterior of r")
axes[1].legend()
savefig(fig, "flow_guide")

report(
    "flow_guide",
    steps=num_steps,
    flow_neg_elbo=results["flow"]["neg_elbo_per_point"],
    autonormal_neg_elbo=results["AutoNormal"]["neg_elbo_per_point"],
    kl_gap=gap,
    flow_seconds=results["flow"]["seconds"],
    autonormal_seconds=results["AutoNormal"]["seconds"],
)
for name, curve in curves.items():
    assert sum(curve[-20:]) < sum(curve[:20]), f"{name}: the loss did not fall"
finish()
