# SPDX-License-Identifier: Apache-2.0
"""A short CUDA smoke run of the regression likelihood with learned noise
(one process): BayesianModule + AutoNormal + DistributedTrace_ELBO on a GPU."""

from __future__ import annotations

import pyro
import torch
from pyro.infer import SVI
from pyro.infer.autoguide import AutoNormal
from torch import nn

import pyro_sp
from pyro_sp.nn import BayesianModule, normal_likelihood

device = torch.device("cuda")
x = torch.randn(64, 3, device=device)
y = x.sum(-1) + 0.1 * torch.randn(64, device=device)
bnn = BayesianModule(nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).to(device))


def model(x, y=None):
    return normal_likelihood(bnn(x), y)


guide = AutoNormal(model)
svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=8))
losses = [svi.step(x, y) for _ in range(50)]
out = pyro_sp.DistributedPredictive(model, guide=guide, num_samples=16, parallel=True, return_sites=("mean",))(x)
print(f"cuda regression: loss {losses[0]:.1f} -> {losses[-1]:.1f}; predictive mean {tuple(out['mean'].shape)} on {out['mean'].device}")
