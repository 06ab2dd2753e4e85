# SPDX-License-Identifier: Apache-2.0
"""Small models and guides shared by the tests; data comes from seeded generators."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer import JitTrace_ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoNormal,
)

import pyro_sp

NUM_DATA = 24
DIM = 3

#: estimator name -> (pyro_sp estimator, the Pyro estimator it replaces)
ESTIMATORS = {
    "trace": (pyro_sp.DistributedTrace_ELBO, Trace_ELBO),
    "jit": (pyro_sp.DistributedJitTrace_ELBO, JitTrace_ELBO),
    "meanfield": (pyro_sp.DistributedTraceMeanField_ELBO, TraceMeanField_ELBO),
}


def make_data(seed: int, n: int = NUM_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g, dtype=torch.float64, device="cpu")
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, device="cpu")
    y = x @ w + 0.3 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64, device="cpu")
    # drawn on the CPU, then moved: the same data on any default device
    to = dict(dtype=torch.get_default_dtype(), device=torch.get_default_device())
    return x.to(**to), y.to(**to)


def model(x, y, subsample=None, subsample_size=None):
    """Bayesian linear regression with a subsampled data plate."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([DIM]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.LogNormal(-1.0, 0.5))
    with pyro.plate("data", x.shape[0], subsample=subsample, subsample_size=subsample_size) as i:
        mean = (x[i] * w).sum(-1) + b
        pyro.sample("obs", dist.Normal(mean, sigma), obs=y[i])


def model_noplate(x, y):
    """The same regression with the observations as one event (no data plate)."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([DIM]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.LogNormal(-1.0, 0.5))
    mean = (x * w.unsqueeze(-2)).sum(-1) + b.unsqueeze(-1)
    pyro.sample("obs", dist.Normal(mean, sigma.unsqueeze(-1)).to_event(1), obs=y)


def param_guide(x, y, *args, **kwargs):
    """A hand-written mean-field guide built from ``pyro.param``."""
    w_loc = pyro.param("w_loc", torch.tensor([0.3, -0.2, 0.1]))
    w_scale = pyro.param("w_scale", torch.full((DIM,), 0.4), constraint=constraints.positive)
    b_loc = pyro.param("b_loc", torch.tensor(0.2))
    b_scale = pyro.param("b_scale", torch.tensor(0.3), constraint=constraints.positive)
    s_loc = pyro.param("s_loc", torch.tensor(-0.5))
    s_scale = pyro.param("s_scale", torch.tensor(0.2), constraint=constraints.positive)
    pyro.sample("w", dist.Normal(w_loc, w_scale).to_event(1))
    pyro.sample("b", dist.Normal(b_loc, b_scale))
    pyro.sample("sigma", dist.LogNormal(s_loc, s_scale))


def make_guide(kind: str, model_fn):
    if kind == "param":
        return param_guide
    if kind == "normal":
        return AutoNormal(model_fn, init_scale=0.3)
    if kind == "diag":
        return AutoDiagonalNormal(model_fn, init_scale=0.3)
    if kind == "lowrank":
        return AutoLowRankMultivariateNormal(model_fn, rank=2, init_scale=0.3)
    if kind == "delta":
        return AutoDelta(model_fn)
    raise ValueError(kind)
