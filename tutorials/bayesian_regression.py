# SPDX-License-Identifier: Apache-2.0
# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Bayesian regression with a `PyroModule`
#
# Pyro's Bayesian regression tutorial, on scikit-learn's bundled diabetes data
# instead of the terrain-ruggedness data it downloads: disease progression
# against body-mass index and a blood-serum measurement (`s5`), standardised.
# A `PyroModule[nn.Linear]` gets priors on its weight and bias, an
# `AutoDiagonalNormal` guide learns the posterior, and `Predictive` gives
# credible intervals.
#
# **What changes for pyro_sp:** the estimator line and `Predictive` ->
# `pyro_sp.DistributedPredictive` (each rank draws its share of the
# posterior samples). This model does not broadcast over a particle
# dimension (`nn.Linear` with a sampled weight), so the 16 particles run
# Pyro's sequential loop: with `vectorize_particles=False` (Pyro's default)
# each rank runs its share of it.
#
#     python tutorials/bayesian_regression.py
#     torchrun --nproc-per-node 2 tutorials/bayesian_regression.py

# %%
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI
from pyro.infer.autoguide import AutoDiagonalNormal
from pyro.nn import PyroModule, PyroSample
from sklearn.datasets import load_diabetes
from torch import nn

import pyro_sp
from _common import Clock, finish, report, savefig, say, steps, SEED

mesh = pyro_sp.init_mesh()
pyro.set_rng_seed(SEED)
pyro.clear_param_store()

bunch = load_diabetes()
columns = [bunch.feature_names.index(n) for n in ("bmi", "s5")]
x = torch.tensor(bunch.data[:, columns], dtype=torch.float32)
y = torch.tensor(bunch.target, dtype=torch.float32)
x = (x - x.mean(0)) / x.std(0)
y = (y - y.mean()) / y.std()


class BayesianRegression(PyroModule):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear = PyroModule[nn.Linear](in_features, out_features)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([out_features, in_features]).to_event(2))
        self.linear.bias = PyroSample(dist.Normal(0.0, 10.0).expand([out_features]).to_event(1))

    def forward(self, x, y=None):
        sigma = pyro.sample("sigma", dist.Uniform(0.0, 10.0))
        mean = self.linear(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, sigma), obs=y)
        return mean


model = BayesianRegression(2, 1)
guide = AutoDiagonalNormal(model)

# %% [markdown]
# The one changed line: `Trace_ELBO(num_particles=16)` becomes
# `pyro_sp.DistributedTrace_ELBO(num_particles=16)`.

# %%
elbo = pyro_sp.DistributedTrace_ELBO(num_particles=16)  # was: Trace_ELBO(num_particles=16)
svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.03}), loss=elbo)
clock = Clock()
num_steps = steps(1500, 80)
losses = [svi.step(x, y) / len(y) for _ in range(num_steps)]
train_seconds = clock()
say(f"loss per data point: {losses[0]:.3f} -> {losses[-1]:.3f} in {train_seconds:.1f} s")

# %% [markdown]
# Posterior samples: `Predictive` becomes `pyro_sp.DistributedPredictive`
# (every rank gets all 800 samples; each drew a share).

# %%
predictive = pyro_sp.DistributedPredictive(  # was: Predictive(...)
    model, guide=guide, num_samples=800, return_sites=("linear.weight", "sigma", "obs", "_RETURN")
)
samples = predictive(x)
weight = samples["linear.weight"].reshape(800, 2)
mu = samples["_RETURN"]
lo, hi = mu.quantile(0.05, 0), mu.quantile(0.95, 0)
y_lo, y_hi = samples["obs"].quantile(0.05, 0), samples["obs"].quantile(0.95, 0)
coverage = ((y >= y_lo) & (y <= y_hi)).float().mean().item()

# least squares, for comparison: with 442 points the prior hardly matters
design = torch.cat([x, torch.ones(len(y), 1)], 1)
ols = torch.linalg.lstsq(design, y.unsqueeze(-1)).solution.squeeze(-1)
say(f"posterior mean weights {weight.mean(0).tolist()} (least squares {ols[:2].tolist()})")
say(f"sigma {samples['sigma'].mean():.3f}; 90% predictive interval covers {coverage:.1%} of the data")

# %%
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = x[:, 0].argsort()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(x[:, 0], y, s=6, alpha=0.5, label="data")
    ax.fill_between(x[order, 0], y_lo[order], y_hi[order], alpha=0.2, label="90% predictive")
    ax.fill_between(x[order, 0], lo[order], hi[order], alpha=0.5, label="90% of the mean")
    ax.set(xlabel="body-mass index (standardised)", ylabel="progression (standardised)")
    ax.legend()
    savefig(fig, "bayesian_regression")
except ImportError:
    say("matplotlib is not installed: no figure")

report(
    "bayesian_regression",
    loss_first=losses[0],
    loss_last=losses[-1],
    weight_mean=weight.mean(0).tolist(),
    weight_std=weight.std(0).tolist(),
    least_squares=ols[:2].tolist(),
    sigma=samples["sigma"].mean().item(),
    coverage_90=coverage,
    train_seconds=train_seconds,
    steps=num_steps,
)
assert losses[-1] < losses[0], "the loss did not fall"
assert (weight.mean(0) - ols[:2]).abs().max() < (0.05 if num_steps >= 1500 else 0.3), "posterior far from least squares"
finish()
