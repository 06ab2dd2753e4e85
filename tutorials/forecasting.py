# SPDX-License-Identifier: Apache-2.0
# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Forecasting with `pyro.contrib.forecast`
#
# Pyro's "Forecasting I" tutorial fits a univariate series with a
# `ForecastingModel` (a regression on time features plus a random-walk drift
# in a time plate), trains it with `Forecaster` and scores the forecast with
# CRPS. It downloads BART ridership; here the series is the Mauna Loa CO2
# record bundled with statsmodels (monthly means 1958–2001): a rising trend
# with a yearly cycle. We train on the first 80 % of the months and forecast
# the last 20 % (105 months).
#
# **What changes for pyro_sp:** `Forecaster` builds its `Trace_ELBO` inside
# its constructor and takes no `loss=`, so pyro_sp provides
# `pyro_sp.DistributedForecaster`: the same class with the estimator split
# over the sample axis (every argument, default and method is Pyro's, and in
# one process it is bit-identical to `Forecaster`). Swap the class name and
# call `init_mesh`; ask for particles (`num_particles=8`), since one particle
# has nothing to split.
#
#     python tutorials/forecasting.py
#     torchrun --nproc-per-node 2 tutorials/forecasting.py

# %%
import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.contrib.forecast import ForecastingModel, eval_crps, eval_mae
from pyro.infer.reparam import LocScaleReparam
from statsmodels.datasets import co2

import pyro_sp
from _common import Clock, finish, report, savefig, say, steps, SEED

mesh = pyro_sp.init_mesh()  # added
pyro.set_rng_seed(SEED)
pyro.clear_param_store()

frame = co2.load_pandas().data.resample("MS").mean().interpolate()
series = torch.tensor(frame["co2"].to_numpy(), dtype=torch.float32)
mean, std = series.mean(), series.std()
data = ((series - mean) / std).unsqueeze(-1)  # (months, 1)
T = len(data)
T1 = int(0.8 * T)
t = torch.arange(T, dtype=torch.float32)
year = 2 * math.pi * t / 12
covariates = torch.stack([t / T, torch.sin(year), torch.cos(year), torch.sin(2 * year), torch.cos(2 * year)], -1)
say(f"{T} months, training on {T1}, forecasting {T - T1}")


# %% [markdown]
# The model, the tutorial's second one: a bias, a linear regression on the
# time features (a linear trend and two yearly harmonics), a random-walk
# level (its steps reparameterized, and the time axis DCT-reparameterized,
# as the tutorial does) and Gaussian noise. It is written for any batch
# shape, so its particles vectorize (`Forecaster`'s default).

# %%
class Model(ForecastingModel):
    def model(self, zero_data, covariates):
        data_dim, feature_dim = zero_data.size(-1), covariates.size(-1)
        bias = pyro.sample("bias", dist.Normal(0.0, 10.0).expand([data_dim]).to_event(1))
        weight = pyro.sample("weight", dist.Normal(0.0, 5.0).expand([feature_dim]).to_event(1))
        drift_scale = pyro.sample("drift_scale", dist.LogNormal(-20.0, 5.0).expand([1]).to_event(1))
        with self.time_plate:
            with poutine.reparam(config={"drift": LocScaleReparam()}):
                drift = pyro.sample("drift", dist.Normal(zero_data, drift_scale).to_event(1))
        prediction = drift.cumsum(-2) + bias + (weight * covariates).sum(-1, keepdim=True)
        noise_scale = pyro.sample("noise_scale", dist.LogNormal(-5.0, 5.0).expand([1]).to_event(1))
        self.predict(dist.Normal(0.0, noise_scale), prediction)


# %% [markdown]
# The one changed line: `Forecaster(...)` becomes `pyro_sp.DistributedForecaster(...)`.

# %%
clock = Clock()
forecaster = pyro_sp.DistributedForecaster(  # was: Forecaster(
    Model(),
    data[:T1],
    covariates[:T1],
    learning_rate=0.1,
    time_reparam="dct",
    num_steps=steps(1000, 40),
    num_particles=8,
    log_every=0,
)
seconds = clock()
samples = forecaster(data[:T1], covariates, num_samples=steps(500, 50))  # (samples, 1, months, 1)
truth = data[T1:]
crps, mae = eval_crps(samples, truth), eval_mae(samples, truth)
say(f"trained in {seconds:.1f} s; forecast CRPS {crps:.4f}, MAE {mae:.4f} (standardised units)")

# %% [markdown]
# The forecast: median and 90 % interval, in ppm.

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ppm = samples.squeeze(-1).squeeze(1) * std + mean  # (samples, months)
lo, med, hi = ppm.quantile(torch.tensor([0.05, 0.5, 0.95]), dim=0)
inside = ((series[T1:] >= lo) & (series[T1:] <= hi)).float().mean().item()
fig, ax = plt.subplots(figsize=(9, 3.4))
ax.plot(t, series, "k", lw=0.8, label="observed")
ax.plot(t[T1:], med, "C0", label="forecast median")
ax.fill_between(t[T1:].numpy(), lo.numpy(), hi.numpy(), color="C0", alpha=0.3, label="90 % interval")
ax.axvline(T1, color="gray", linestyle=":")
ax.set(xlabel="months since March 1958", ylabel="CO2 (ppm)", title="Mauna Loa CO2")
ax.legend(loc="upper left")
savefig(fig, "forecasting")
say(f"90 % interval covers {inside:.1%} of the held-out months")

report(
    "forecasting",
    crps=crps,
    mae=mae,
    coverage_90=inside,
    loss_first=forecaster.losses[0],
    loss_last=forecaster.losses[-1],
    seconds=seconds,
    steps=len(forecaster.losses),
)
assert forecaster.losses[-1] < forecaster.losses[0], "the loss did not fall"
finish()
