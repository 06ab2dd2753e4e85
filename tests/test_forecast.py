# SPDX-License-Identifier: Apache-2.0
"""DistributedForecaster: Pyro's Forecaster with pyro_sp's estimator."""

from __future__ import annotations

import pyro
import pytest
import pyro.distributions as dist
import torch
from pyro.contrib.forecast import Forecaster, ForecastingModel

import pyro_sp


class _Level(ForecastingModel):
    """A local-level model with a weekly covariate, as in Pyro's forecasting tutorials."""

    def model(self, zero_data, covariates):
        data_dim, feature_dim = zero_data.size(-1), covariates.size(-1)
        bias = pyro.sample("bias", dist.Normal(0.0, 10.0).expand([data_dim]).to_event(1))
        weight = pyro.sample("weight", dist.Normal(0.0, 1.0).expand([feature_dim]).to_event(1))
        drift_scale = pyro.sample("drift_scale", dist.LogNormal(-2.0, 1.0).expand([data_dim]).to_event(1))
        with self.time_plate:
            drift = pyro.sample("drift", dist.Normal(zero_data, drift_scale).to_event(1))
        prediction = drift.cumsum(-2) + bias + (weight * covariates).sum(-1, keepdim=True)
        noise = pyro.sample("noise", dist.LogNormal(-1.0, 1.0).expand([1]).to_event(1))
        self.predict(dist.Normal(0.0, noise), prediction)


def _series(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(60.0)
    covariates = torch.stack([torch.sin(2 * torch.pi * t / 7), torch.cos(2 * torch.pi * t / 7)], -1)
    data = (0.05 * t + covariates[:, 0] + 0.3 * torch.randn(60, generator=g)).unsqueeze(-1)
    return data, covariates


def _train(cls, num_particles: int, seed: int = 3, **options):
    data, covariates = _series()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    f = cls(_Level(), data[:50], covariates[:50], num_steps=30, num_particles=num_particles, log_every=0, **options)
    samples = f(data[:50], covariates, num_samples=20)
    return f.losses, {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}, samples


@pytest.mark.parametrize(
    "options",
    [{}, {"time_reparam": "dct"}, {"time_reparam": "haar", "dct_gradients": True}, {"warm_start": True}],
    ids=["default", "dct", "haar-dct_gradients", "warm_start"],
)
def test_one_process_is_pyros_forecaster_bit_for_bit(options):
    mine = _train(pyro_sp.DistributedForecaster, 4, **options)
    theirs = _train(Forecaster, 4, **options)
    assert mine[0] == theirs[0]
    assert mine[1].keys() == theirs[1].keys()
    for n in mine[1]:
        assert torch.equal(mine[1][n], theirs[1][n]), n
    assert torch.equal(mine[2], theirs[2])


def distributed_forecaster():
    return _train(pyro_sp.DistributedForecaster, 4)


def test_two_ranks_train_one_forecaster(pools):
    (l0, p0, s0), (l1, p1, s1) = pools(2).run(distributed_forecaster)
    assert l0 == l1 and sum(l0[-5:]) < sum(l0[:5]), "the loss did not fall"
    for n in p0:
        assert torch.equal(p0[n], p1[n]), n  # one model on both ranks
    # Pyro's own layout: (num_samples, *plates, duration, obs_dim), here [20, 1, 10, 1]
    assert s0.shape == _train(Forecaster, 4)[2].shape and torch.equal(s0, s1)
