# SPDX-License-Identifier: Apache-2.0
"""Any ``torch.nn.Module`` made Bayesian, with all particles in one forward."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable

import pyro
import pyro.distributions as dist
import torch
from torch.func import functional_call, replace_all_batch_norm_modules_, vmap

__all__ = ["BayesianModule", "last_layer"]

#: What ``bayesian=`` accepts: all parameters (None), names or name prefixes, or a predicate.
Selector = None | str | Iterable[str] | Callable[[str, torch.Tensor], bool]
#: What ``prior_scale=`` accepts: one scale, ``"fan_in"``, per-prefix scales, or a function.
ScaleSpec = float | str | dict | Callable[[str, torch.Tensor], float]

_RANDOMNESS = ("different", "same")


def last_layer(module: torch.nn.Module) -> str:
    """The name of the last ``Linear``/``Conv``/``MultiheadAttention`` submodule: for ``bayesian=last_layer(net)``."""
    names = [
        name
        for name, m in module.named_modules()
        if name and isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.MultiheadAttention))
    ]
    if not names:
        raise ValueError(f"Expected a module with a Linear, Conv or attention layer, got {type(module).__name__}.")
    return names[-1]


def _selected(selector: Selector, name: str, value: torch.Tensor) -> bool:
    if selector is None:
        return True
    if callable(selector):
        return bool(selector(name, value))
    prefixes = [selector] if isinstance(selector, str) else list(selector)
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _fan_in(value: torch.Tensor) -> int:
    return math.prod(value.shape[1:])


def _scale(spec: ScaleSpec, name: str, value: torch.Tensor) -> float:
    if callable(spec):
        return float(spec(name, value))
    if isinstance(spec, dict):
        matches = [p for p in spec if name == p or name.startswith(p + ".")]
        if not matches:
            raise ValueError(f"Expected a prior scale for {name!r} in {sorted(spec)}; add its layer.")
        return _scale(spec[max(matches, key=len)], name, value)
    if spec == "fan_in":
        return 1.0 / math.sqrt(_fan_in(value)) if value.dim() > 1 else 1.0
    if isinstance(spec, str):
        raise ValueError(f"Expected prior_scale to be a number, 'fan_in', a dict or a function, got {spec!r}.")
    return float(spec)


class BayesianModule(torch.nn.Module):
    """
    Make an ordinary :class:`torch.nn.Module` Bayesian: its chosen parameters
    become Pyro sample sites with priors, and the forward pass evaluates all
    particles of the vectorized ELBO at once with :func:`torch.func.vmap` over
    :func:`torch.func.functional_call`.

    Inside a Pyro model, ``out = bnn(x)`` samples every Bayesian parameter
    (site ``f"{name}.{parameter}"``, prior :math:`\\mathcal N(0, \\sigma^2)`)
    and returns the outputs of all particles, shape ``(P, *out)`` with the
    particles on the left; without a particle plate (e.g. during an
    autoguide's setup) the shape is ``out``. The
    deterministic parameters are ``pyro.param`` sites named the same way.
    Every ``Distributed…_ELBO`` and autoguide accepts the result: it is an
    ordinary Pyro program. Give autoguides ``init_loc_fn=bnn.init_to_module``
    to start the guide at the network's initial weights.

    ``nn.Linear`` and ``nn.Conv2d`` inside a ``PyroModule`` fail when a
    sampled weight carries a particle dimension; here each particle's weights
    go through the unchanged module, so any layer works (attention,
    normalisation, convolutions, custom code).

    :param torch.nn.Module module: the network; it is deep-copied, the copy's
        initial values become the deterministic parameters' initial values.
    :param str name: prefix of the site names.
    :param bayesian: which parameters are random: ``None`` (all), a parameter
        name or layer prefix, a list of them (``last_layer(net)`` gives the
        last layer), or ``f(name, tensor) -> bool``.
    :param prior_scale: :math:`\\sigma` of the Normal prior: a number, ``"fan_in"``
        (:math:`1/\\sqrt{\\text{fan in}}` for weights, 1 for biases), a dict
        from layer prefix to either, or ``f(name, tensor) -> float``.
    :param str dropout: ``"different"`` (default): each particle draws its own
        dropout masks (``vmap(randomness="different")``); ``"same"``: all
        particles share the masks of one draw.

    BatchNorm layers normalise with the statistics of the batch at hand, in
    training and in prediction (:func:`torch.func.replace_all_batch_norm_modules_`):
    running statistics cannot be updated in place under ``vmap``.

    Memory: the vectorized forward holds, per particle, one copy of the
    Bayesian parameters (sampled values) and of every activation of the
    network for the batch; the deterministic parameters are shared.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        name: str = "net",
        bayesian: Selector = None,
        prior_scale: ScaleSpec = 1.0,
        dropout: str = "different",
    ) -> None:
        super().__init__()
        if dropout not in _RANDOMNESS:
            raise ValueError(f"Expected dropout in {_RANDOMNESS}, got {dropout!r}.")
        self.module = copy.deepcopy(module)
        replace_all_batch_norm_modules_(self.module)
        for p in self.module.parameters():  # templates only: the values live in Pyro's sites
            p.requires_grad_(False)
        self.name = name
        self.dropout = dropout
        named = dict(self.module.named_parameters())
        self.bayesian_names = [n for n, p in named.items() if _selected(bayesian, n, p)]
        if not self.bayesian_names:
            raise ValueError(
                f"Expected at least one Bayesian parameter, but bayesian={bayesian!r} selects none "
                f"of {list(named)}."
            )
        self.prior_scales = {n: _scale(prior_scale, n, named[n]) for n in self.bayesian_names}
        self.deterministic_names = [n for n in named if n not in self.prior_scales]

    def prior(self, name: str) -> dist.Distribution:
        """The prior of Bayesian parameter ``name`` (override for other priors)."""
        value = dict(self.module.named_parameters())[name]
        return dist.Normal(torch.zeros_like(value), self.prior_scales[name]).to_event(value.dim())

    def init_to_module(self, site: dict, fallback: Callable | None = None) -> torch.Tensor:
        """
        An ``init_loc_fn`` for Pyro's autoguides: a Bayesian parameter's guide
        mean starts at the network's own initial value (as ``MeanFieldVI``'s
        ``init_loc="module"``); other sites go to ``fallback`` (default
        :func:`~pyro.infer.autoguide.initialization.init_to_feasible`, the
        autoguides' own default start for a site without a value).

        Autoguides start every site at a prior-feasible point, which for a
        Normal prior is zero: every weight of a layer then starts equal, and
        a network of ReLU layers (a CNN especially) may not train at all.

        .. code-block:: python

            guide = AutoNormal(model, init_loc_fn=bnn.init_to_module)
        """
        prefix = f"{self.name}."
        name = site["name"][len(prefix):] if site["name"].startswith(prefix) else None
        if name in self.prior_scales:
            return dict(self.module.named_parameters())[name].detach().clone()
        if fallback is None:
            from pyro.infer.autoguide.initialization import init_to_feasible as fallback
        return fallback(site)

    def forward(self, *args, **kwargs):
        shapes = {n: p.shape for n, p in self.module.named_parameters()}
        samples, batch = {}, None
        for n in self.bayesian_names:
            value = pyro.sample(f"{self.name}.{n}", self.prior(n))
            lead = value.shape[: value.dim() - len(shapes[n])]
            if batch is None:
                batch = lead
            elif lead != batch:
                raise ValueError(
                    f"Expected every Bayesian parameter to carry the same particle dimensions, "
                    f"got {tuple(batch)} and {tuple(lead)} (at {n!r})."
                )
            samples[n] = value
        if sum(d != 1 for d in batch) > 1:
            raise ValueError(
                f"Expected at most one particle dimension on the sampled parameters, got batch "
                f"shape {tuple(batch)}. Sample the network outside data plates."
            )
        num = math.prod(batch)
        stacked = {n: v.reshape((num,) + shapes[n]) for n, v in samples.items()}
        fixed = {
            n: pyro.param(f"{self.name}.{n}", lambda n=n: dict(self.module.named_parameters())[n].detach().clone())
            for n in self.deterministic_names
        }
        out = self.functional_forward(stacked, fixed, args, kwargs)
        return out if batch else _squeeze_particles(out)

    def functional_forward(self, samples: dict, fixed: dict, args: tuple, kwargs: dict | None = None, *,
                           module: torch.nn.Module | None = None, num: int | None = None):
        """
        The network on :math:`P` draws of its Bayesian parameters at once: the
        vectorized functional forward of every path (this module's Pyro model
        and :class:`~pyro_sp.nn.MeanFieldVI`'s fused step).

        :param dict samples: Bayesian parameter name -> tensor ``(P, *shape)``.
        :param dict fixed: deterministic parameter name -> tensor ``shape``.
        :param module: the network to run (default: this module's); ``MeanFieldVI``'s
            layer estimators pass a copy whose layers draw their own noise
            (:mod:`pyro_sp.nn.layer_estimators`).
        :param int num: :math:`P` where ``samples`` is empty (every Bayesian tensor drawn
            inside ``module``).
        :returns: the network's outputs with the particles on the left, ``(P, ...)``
            (dropout drawn per ``dropout=``).
        """
        module = self.module if module is None else module
        buffers = dict(self.module.named_buffers())

        def one_particle(params, _, args, kwargs):
            return functional_call(module, {**params, **fixed, **buffers}, args, kwargs)

        particles = None if samples else torch.empty((num, 0))  # only its size is read
        return vmap(one_particle, in_dims=(0 if samples else None, None if samples else 0, None, None),
                    randomness=self.dropout)(samples, particles, args, kwargs or {})


def _squeeze_particles(out):
    if isinstance(out, torch.Tensor):
        return out.squeeze(0)
    if isinstance(out, (tuple, list)):
        return type(out)(_squeeze_particles(o) for o in out)
    if isinstance(out, dict):
        return {k: _squeeze_particles(v) for k, v in out.items()}
    return out
