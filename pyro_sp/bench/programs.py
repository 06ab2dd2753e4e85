# SPDX-License-Identifier: Apache-2.0
"""Pyro programs of the ``compiled`` benchmark suite (:mod:`pyro_sp.bench.compiled`):
static models with their guides, synthetic data and the family of their estimator.

=========== ================================================================== =========
program     model and guide                                                    family
=========== ================================================================== =========
``vae``     a VAE as in Pyro's VAE tutorial (``pyro.module`` encoder/decoder,   ``trace``
            softplus hidden layer, Bernoulli likelihood) on MNIST-shaped
            binary data: 784 inputs, batch 256, hidden 400, latent 50
``gmm``     a 2-D Gaussian mixture of K=3 components as in Pyro's GMM tutorial: ``enum``
            global weights, locs and scales (``AutoDelta``: MAP), the discrete
            assignment enumerated in parallel, 1000 points
``small``   Bayesian linear regression, 5 weights, a bias and a noise scale,    ``trace``
            ``AutoNormal`` guide, 100 points: a step bound by overhead
``mlp``     the Bayesian MLP of :mod:`pyro_sp.bench.gpu` (``BayesianModule`` +  ``trace``
            ``AutoNormal``, categorical likelihood)
=========== ================================================================== =========

Every model broadcasts over a leftmost particle dimension (the estimators run with
``vectorize_particles=True``) and has one plate level (``max_plate_nesting=1``).
``tiny=True`` shrinks every program to a CPU smoke-run size. Each call of
:func:`build` gives fresh modules and guides (the caller clears the param store).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.infer.autoguide import AutoDelta, AutoNormal
from pyro.ops.indexing import Vindex
from torch import nn

__all__ = ["PROGRAMS", "Program", "build"]


@dataclass
class Program:
    """
    One benchmark program.

    :param str name: its key in :data:`PROGRAMS`.
    :param model: the Pyro model, called as ``model(*args)``.
    :param guide: the guide, called the same way.
    :param tuple args: the tensors of one step (on the device).
    :param str family: ``"trace"`` (``Trace_ELBO`` and its peers) or ``"enum"``
        (``TraceEnum_ELBO`` and its peers).
    :param dict elbo_kwargs: further arguments of every estimator of the program.
    :param float lr: the learning rate of ``pyro.optim.Adam``.
    """

    name: str
    model: Callable
    guide: Callable
    args: tuple
    family: str
    elbo_kwargs: dict = field(default_factory=lambda: {"max_plate_nesting": 1})
    lr: float = 1e-3


# ---- vae --------------------------------------------------------------------------


class Encoder(nn.Module):
    """``x -> (z_loc, z_scale)``: one softplus hidden layer (Pyro's VAE tutorial)."""

    def __init__(self, inputs: int, hidden: int, z: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(inputs, hidden)
        self.fc21 = nn.Linear(hidden, z)
        self.fc22 = nn.Linear(hidden, z)

    def forward(self, x: torch.Tensor):
        h = nn.functional.softplus(self.fc1(x))
        return self.fc21(h), torch.exp(self.fc22(h))


class Decoder(nn.Module):
    """``z -> logits`` of the Bernoulli pixels: one softplus hidden layer."""

    def __init__(self, z: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(z, hidden)
        self.fc21 = nn.Linear(hidden, outputs)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc21(nn.functional.softplus(self.fc1(z)))


class VAE(nn.Module):
    """The model and guide of Pyro's VAE tutorial; the likelihood takes logits (stabler than
    the tutorial's sigmoid probabilities, the same distribution)."""

    def __init__(self, inputs: int, hidden: int, z: int) -> None:
        super().__init__()
        self.z = z
        self.encoder = Encoder(inputs, hidden, z)
        self.decoder = Decoder(z, hidden, inputs)

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(()), 1.0).expand([x.shape[0], self.z]).to_event(1)
            z = pyro.sample("latent", prior)
            pyro.sample("obs", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(loc, scale).to_event(1))


def vae(tiny: bool, device) -> Program:
    """:class:`VAE` on binary data: 784 inputs, batch 256, hidden 400, latent 50
    (``tiny``: 64 inputs, batch 32, hidden 32, latent 8)."""
    inputs, batch, hidden, z = (64, 32, 32, 8) if tiny else (784, 256, 400, 50)
    net = VAE(inputs, hidden, z).to(device)
    x = torch.rand(batch, inputs, generator=torch.Generator().manual_seed(0)).round().to(device)
    return Program("vae", net.model, net.guide, (x,), "trace")


# ---- gmm --------------------------------------------------------------------------

GMM_COMPONENTS = 3


@config_enumerate(default="parallel")
def gmm_model(data: torch.Tensor) -> None:
    """A Gaussian mixture of :data:`GMM_COMPONENTS` components in ``data.shape[-1]`` dimensions.

    ``locs`` and ``scales`` carry the particle dimension (if any) left of the component
    plate: ``Vindex(locs.unsqueeze(-3))[..., a, :]`` lines it up with the particle plate
    and puts the chosen component's row under the data plate.
    """
    k, d = GMM_COMPONENTS, data.shape[-1]
    one = data.new_ones(())
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * one.expand([k])))
    with pyro.plate("components", k):
        locs = pyro.sample("locs", dist.Normal(0.0 * one, 10.0).expand([d]).to_event(1))
        scales = pyro.sample("scales", dist.LogNormal(0.0 * one, 2.0).expand([d]).to_event(1))
    with pyro.plate("data", data.shape[0]):
        a = pyro.sample("assignment", dist.Categorical(weights))
        loc = Vindex(locs.unsqueeze(-3))[..., a, :]
        scale = Vindex(scales.unsqueeze(-3))[..., a, :]
        pyro.sample("obs", dist.Normal(loc, scale).to_event(1), obs=data)


def gmm(tiny: bool, device) -> Program:
    """:func:`gmm_model` on 1000 points (``tiny``: 100) from three 2-D clusters, MAP guide."""
    g = torch.Generator().manual_seed(0)
    n = 100 if tiny else 1000
    centers = torch.tensor([[-4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    data = (centers[torch.randint(0, GMM_COMPONENTS, (n,), generator=g)] + torch.randn(n, 2, generator=g)).to(device)
    guide = AutoDelta(poutine.block(gmm_model, expose=["weights", "locs", "scales"]))
    return Program("gmm", gmm_model, guide, (data,), "enum", lr=1e-2)


# ---- small ------------------------------------------------------------------------


def regression_model(x: torch.Tensor, y: torch.Tensor) -> None:
    """Bayesian linear regression ``y ~ Normal(x @ w + b, sigma)``."""
    zero = x.new_zeros(())
    w = pyro.sample("w", dist.Normal(zero, 1.0).expand([x.shape[-1]]).to_event(1))
    b = pyro.sample("b", dist.Normal(zero, 10.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0 + zero))
    mean = (x * w).sum(-1) + b  # w: (particles, 1, features) under the particle plate
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


def small(tiny: bool, device) -> Program:
    """:func:`regression_model` on 100 x 5 synthetic data (the same with ``tiny``)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 5, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.5 + 0.3 * torch.randn(100, generator=g)
    return Program("small", regression_model, AutoNormal(regression_model), (x.to(device), y.to(device)),
                   "trace", lr=1e-2)


# ---- mlp --------------------------------------------------------------------------


def mlp(tiny: bool, device) -> Program:
    """The model and guide of :func:`pyro_sp.bench.gpu.make_step`'s ``pyro`` variant on
    :func:`pyro_sp.bench.gpu.problem` ``("mlp", tiny, device)``."""
    from pyro_sp.bench.gpu import problem
    from pyro_sp.nn import BayesianModule, categorical_likelihood

    net, x, y = problem("mlp", tiny, device)
    bnn = BayesianModule(net, prior_scale="fan_in")

    def model(x, y):
        return categorical_likelihood(bnn(x), y)

    # as in gpu.make_step: no max_plate_nesting (Pyro finds it)
    return Program("mlp", model, AutoNormal(model, init_scale=0.01), (x, y), "trace", elbo_kwargs={})


#: program name -> ``(tiny, device) -> Program``
PROGRAMS: dict[str, Callable[[bool, torch.device], Program]] = {"vae": vae, "gmm": gmm, "small": small, "mlp": mlp}


def build(name: str, tiny: bool, device) -> Program:
    """A fresh :class:`Program` ``name`` (torch's global RNG seeded with 0 first, so module
    initialisations repeat)."""
    if name not in PROGRAMS:
        raise ValueError(f"Expected a program in {sorted(PROGRAMS)}, got {name!r}.")
    torch.manual_seed(0)
    return PROGRAMS[name](tiny, torch.device(device))
