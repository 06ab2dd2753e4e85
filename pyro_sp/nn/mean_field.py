# SPDX-License-Identifier: Apache-2.0
"""A fused, compilable sampling-parallel step for mean-field BNNs."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable

import pyro
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pyro.distributions import constraints

from pyro_sp.distributed.collectives import broadcast_tensors, gather_rows
from pyro_sp.distributed.failure import abort_reason, aborted, failing_fast
from pyro_sp.distributed.gradients import GRADIENT_STRATEGIES, BucketedSum, all_reduce_gradients
from pyro_sp.distributed.guard import guarded
from pyro_sp.distributed.mesh import SPMesh, default_mesh, share_counts
from pyro_sp.distributed.record import recorded
from pyro_sp.distributed.streams import RNGStream, stream_seed

from .bayesian_module import BayesianModule
from .layer_estimators import ESTIMATORS, LayerEstimator, reparameterized_layers, swap_layers
from .likelihoods import LogLikelihood, log_likelihood
from .regenerated_noise import (RegeneratedNoiseLinear, draw_seeds, fp32_matmul_precision, require_triton,
                               sampled_log_densities)
from .step_graph import StepGraphs, capturable, optimizer_key, tensors_key

__all__ = ["MeanFieldVI"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_KL = ("analytic", "sample")
_CHECK = ("first", "always")
_PRECISIONS = ("fp32", "bf16")
_WEIGHT_NOISE = ("stored", "regenerated")


def _as_grad(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``g`` as ``p``'s ``.grad``: itself where it has ``p``'s strides, else a copy with them (as
    ``backward`` keeps a gradient: ``torch.autograd``'s layout contract)."""
    if g.stride() == p.stride():
        return g
    return torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=p.device).copy_(g)


def _zero_grads(optimizer, zeroed: Callable[[int], bool]) -> None:
    """Zero in place the gradients of ``optimizer``'s parameters whose ``id`` ``zeroed`` picks
    (``zero_grad(set_to_none=False)`` for some of them)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]
             if p.grad is not None and zeroed(id(p))]
    if grads:
        torch._foreach_zero_(grads)


def _inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


class _Posterior(torch.nn.Module):
    """
    The variational parameters and this rank's share of the loss. This is the
    module :class:`~torch.nn.parallel.DistributedDataParallel` wraps: its
    gradient buckets are summed while the backward pass is still running.
    """

    def __init__(self, bnn: BayesianModule, init_scale: float, init_loc: str, estimator: str = "exact",
                 weight_noise: str = "stored") -> None:
        super().__init__()
        self.bnn = bnn
        named = dict(bnn.module.named_parameters())
        self.names = list(bnn.bayesian_names)
        self.estimator = estimator
        self.regenerated = estimator == "exact" and weight_noise == "regenerated"
        # the layers the estimator evaluates (none for "exact" with stored noise), and the network
        # with those layers swapped (a plain attribute: it holds no values, every call passes them)
        if self.regenerated:
            self.layers = reparameterized_layers(bnn.module, self.names, "regenerated")
            make = RegeneratedNoiseLinear
        else:
            self.layers = {} if estimator == "exact" else reparameterized_layers(bnn.module, self.names, estimator)
            make = lambda layer, bayesian_bias: LayerEstimator(layer, estimator, bayesian_bias)  # noqa: E731
        object.__setattr__(self, "swapped", swap_layers(bnn.module, self.layers, make) if self.layers else None)
        #: the swapped regenerated-noise layers, handed torch's fp32 matmul precision before each call
        self.regenerated_layers = [m for m in (self.swapped.modules() if self.swapped is not None else ())
                                   if isinstance(m, RegeneratedNoiseLinear)]
        # Bayesian tensor name -> (its layer's prefix, "weight" or "bias"): the ones the layers take
        self._layer_of = {}
        for path, bayesian_bias in self.layers.items():
            prefix = f"{path}." if path else ""
            self._layer_of[f"{prefix}weight"] = (prefix, "weight")
            if bayesian_bias and estimator == "local_reparam":
                self._layer_of[f"{prefix}bias"] = (prefix, "bias")
        self.locs = torch.nn.ParameterList()
        self.rhos = torch.nn.ParameterList()
        self.fixed = torch.nn.ParameterList()
        for n in self.names:
            template = named[n].detach()
            loc = template.clone() if init_loc == "module" else torch.zeros_like(template)
            self.locs.append(torch.nn.Parameter(loc))
            self.rhos.append(
                torch.nn.Parameter(_inverse_softplus(torch.full_like(template, float(init_scale))))
            )
        for n in bnn.deterministic_names:
            self.fixed.append(torch.nn.Parameter(named[n].detach().clone()))
        self.prior_scales = [bnn.prior_scales[n] for n in self.names]

    def trainable(self) -> list[torch.nn.Parameter]:
        """The guide's and the deterministic parameters (not the network's templates)."""
        # the lists' own storage: indexing a ParameterList costs microseconds an entry, paid on the
        # host before every step
        return [*self.locs._parameters.values(), *self.rhos._parameters.values(), *self.fixed._parameters.values()]

    def sample(self, num: int, noise: list[torch.Tensor] | None) -> tuple[list, list]:
        """``num`` draws of every Bayesian tensor, ``loc + eps * softplus(rho)`` (as Pyro's
        ``Normal.rsample``), and the standard-normal ``eps`` behind them."""
        values, noises = [], []
        for i, (loc, rho) in enumerate(zip(self.locs, self.rhos)):
            eps = (
                torch.randn((num,) + loc.shape, dtype=loc.dtype, device=loc.device)
                if noise is None
                else noise[i]
            )
            values.append(loc + eps * F.softplus(rho))
            noises.append(eps)
        return values, noises

    def outputs(self, values: list[torch.Tensor], args, kwargs):
        """The network's outputs for the sampled Bayesian tensors (particles on the left)."""
        fixed = dict(zip(self.bnn.deterministic_names, self.fixed))
        return self.bnn.functional_forward(dict(zip(self.names, values)), fixed, args, kwargs)

    def swapped_outputs(self, num: int, args, noise=None, draws: bool = False) -> tuple[list, list, torch.Tensor]:
        """
        The outputs of ``num`` particles through the network with swapped layers: a layer
        estimator's (:mod:`~pyro_sp.nn.layer_estimators`: the guide's means and scales for
        ``local_reparam``, a per-particle perturbation for ``flipout``) or the regenerated-noise
        ``Linear`` layers (:mod:`~pyro_sp.nn.regenerated_noise`: mean, scale and one seed per
        particle); every other Bayesian tensor is drawn as usual. ``noise`` pins the draws (the
        seeds, for regenerated weights). Returns the draws ``loc + eps * scale`` (``None`` where a
        layer draws no weight; a Flipout weight's only if ``draws``, for the sampled KL), their
        noise (``eps``, the seeds, or ``None``), and the outputs.
        """
        layer_of, kind = self._layer_of, "regenerated" if self.regenerated else self.estimator
        samples, fixed, values, noises = {}, dict(zip(self.bnn.deterministic_names, self.fixed)), [], []
        for i, (n, loc, rho) in enumerate(zip(self.names, self.locs, self.rhos)):
            scale, given = F.softplus(rho), None if noise is None else noise[i]
            if n in layer_of and kind != "flipout":  # the layer takes the mean and scale
                prefix, what = layer_of[n]
                fixed[n], fixed[f"{prefix}{what}_scale"] = loc, scale
                seeds = None
                if kind == "regenerated":
                    seeds = draw_seeds(num, loc.device) if given is None else given
                    samples[f"{prefix}weight_seed"] = seeds
                values.append(None)
                noises.append(seeds)
                continue
            eps = torch.randn((num,) + loc.shape, dtype=loc.dtype, device=loc.device) if given is None else given
            if n in layer_of:  # flipout: the mean shared, one perturbation per particle
                prefix, _ = layer_of[n]
                fixed[n], samples[f"{prefix}weight_delta"] = loc, eps * scale
                values.append(loc + samples[f"{prefix}weight_delta"] if draws else None)
            else:
                samples[n] = loc + eps * scale
                values.append(samples[n])
            noises.append(eps)
        out = self.bnn.functional_forward(samples, fixed, args, {}, module=self.swapped, num=num)
        return values, noises, out

    def forward(self, x, y, num: int, weight: float, ll_scale: float, kl: str, loglik, noise=None,
                precision: str = "fp32"):
        # bf16: the network's products (and the draws they read, which inductor fuses into
        # them) in bfloat16 under autocast; the outputs, log-densities, KL and gradients'
        # accumulation into the fp32 parameters stay in fp32
        low = torch.autocast(x.device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with low:
            if self.swapped is None:  # the exact estimator, every draw stored
                values, noises = self.sample(num, noise)
                out = self.outputs(values, (x,), {})
            else:
                if noise is not None and not self.regenerated:
                    raise ValueError(f"Expected noise=None with estimator={self.estimator!r}: pinned noise "
                                     "is the exact estimator's test hook (one draw per Bayesian tensor).")
                values, noises, out = self.swapped_outputs(num, (x,), noise, draws=kl == "sample")
        if precision == "bf16":
            out = out.float()
        log_lik = loglik(out, y)
        if log_lik.shape != (num, y.shape[0]):
            raise ValueError(
                f"Expected the log-likelihood of shape (particles={num}, batch={y.shape[0]}), got "
                f"{tuple(log_lik.shape)}: the network must return one output per data point."
            )
        total = -ll_scale * log_lik.sum()
        if kl == "analytic":
            kl_sum = 0.0
            for loc, rho, s in zip(self.locs, self.rhos, self.prior_scales):
                ratio = (F.softplus(rho) / s) ** 2
                kl_sum = kl_sum + 0.5 * (ratio + (loc / s) ** 2 - 1 - ratio.log()).sum()
            total = total + num * kl_sum
        else:
            for value, eps, loc, rho, s in zip(values, noises, self.locs, self.rhos, self.prior_scales):
                if value is None:  # a regenerated weight: eps holds its seeds
                    log_p_sum, log_q_sum = sampled_log_densities(loc, F.softplus(rho), s, eps)
                    total = total - log_p_sum + log_q_sum
                    continue
                # log q at the reparameterized point: (z - loc) / scale is eps, so
                # log q = -eps^2 / 2 - log scale - log sqrt(2 pi), Pyro's value to rounding; its
                # score-function gradient, zero in expectation and zero up to rounding in Pyro, is
                # exactly zero here, and no (z - loc) tensor is kept for backward
                log_q_sum = -0.5 * (eps.detach() ** 2).sum() - num * F.softplus(rho).log().sum() \
                    - num * eps[0].numel() * _HALF_LOG_2PI
                log_p = -(value**2) / (2 * s**2) - math.log(s) - _HALF_LOG_2PI
                total = total - log_p.sum() + log_q_sum
        return weight * total


class MeanFieldVI(torch.nn.Module):
    """
    Mean-field variational inference for a :class:`BayesianModule`, with each
    step fused into a few tensor programs (optionally :func:`torch.compile`\\ d)
    and the gradients reduced by either of pyro_sp's two strategies.

    It computes the same estimator as Pyro's ``Trace_ELBO`` (``kl="sample"``)
    or ``TraceMeanField_ELBO`` (``kl="analytic"``, the default) with
    ``vectorize_particles=True`` and an ``AutoNormal`` guide on the model

    .. code-block:: python

        def model(x, y):
            categorical_likelihood(bnn(x), y, num_data=num_data)   # or normal_likelihood

    but without Pyro's per-site machinery: for each Bayesian tensor
    :math:`w_j` with guide :math:`q(w_j) = \\mathcal N(\\mu_j, \\mathrm{softplus}(\\rho_j)^2)`
    and prior :math:`\\mathcal N(0, \\sigma_j^2)`,

    .. math::

        \\mathcal L = -\\frac{1}{N}\\sum_{k=1}^{N}\\Big[\\frac{M}{B}\\sum_{i=1}^{B}
            \\log p(y_i \\mid x_i, w^{(k)})
            + \\sum_j \\big(\\log p(w_j^{(k)}) - \\log q(w_j^{(k)})\\big)\\Big],
        \\qquad w_j^{(k)} = \\mu_j + \\epsilon_j^{(k)} \\mathrm{softplus}(\\rho_j),

    where the bracketed prior-minus-guide sum is replaced by
    :math:`-\\mathrm{KL}(q \\| p)` in closed form when ``kl="analytic"``
    (:math:`M` = ``num_data``, :math:`B` the batch). Given the same noise,
    loss and gradients equal Pyro's to rounding (tested in float64).

    On a mesh, rank :math:`(s, d)` draws its share of the particles from its
    own stream and scales its partial loss by :math:`1/(N D)`; the gradients
    are *summed* over the world by one of the two strategies of
    :mod:`pyro_sp.distributed.gradients`: ``"bucketed"`` (the default; buckets
    reduced while backward still runs, the gradients views of the buckets) or
    ``"flat"`` (one all-reduce after backward, as the estimators do). Either
    way the reduced gradient is the single-process gradient exactly, for any
    ``num_particles`` (uneven shares included). Everything distributed here is
    the shared core's (mesh, guard, streams, gradients); what is
    ``MeanFieldVI``'s own is the fused local loss.

    :param BayesianModule bnn: the network; its Bayesian parameters get the
        guide, the others are trained as point estimates. Its priors must be
        the default Normal priors (:meth:`BayesianModule.prior` not overridden).
    :param likelihood: ``"categorical"`` (the network returns logits
        ``(batch, classes)``), ``"normal"`` (means ``(batch,)`` or
        ``(batch, 1)``, fixed ``noise_scale``), or ``f(outputs, y)`` returning
        log-densities of shape ``(particles, batch)`` for outputs with the
        particles on the left.
    :param int num_particles: the global number of particles :math:`N`.
    :param int num_data: size of the data set :math:`M` (default: the batch).
    :param float noise_scale: :math:`\\sigma` of the ``"normal"`` likelihood.
    :param str kl: ``"analytic"`` or ``"sample"`` (see above).
    :param str estimator: ``"exact"`` (the default: every Bayesian tensor drawn, the
        estimator above), or a lower-variance, unbiased estimator of the same loss and
        gradient for the ``Linear``/``Conv2d`` layers with a Bayesian weight
        (:mod:`pyro_sp.nn.layer_estimators`): ``"local_reparam"`` (pre-activations drawn
        instead of weights; ``Linear`` layers on ``(batch, features)`` inputs, with
        ``kl="analytic"``) or ``"flipout"`` (one weight perturbation per particle, sign-flipped
        per example). Their losses are not Pyro's numbers, only equal in expectation.
        :meth:`predict` always draws weights.
    :param str precision: ``"fp32"`` (the default) or ``"bf16"``: the network's products,
        and the weight draws they read, in bfloat16 (``torch.autocast``); the outputs,
        log-densities, KL, gradients and parameters stay in fp32. Faster on GPUs with
        bf16 matrix units, at a few percent relative error in the gradients and under 1e-3
        in the loss (measured on digits: README); :meth:`predict` runs in fp32.
    :param str weight_noise: ``"stored"`` (the default: every weight draw is a tensor,
        written and kept for backward) or ``"regenerated"`` (the exact estimator only): the
        ``Linear`` layers' weight noise is drawn inside Triton kernels from one seed per
        particle and layer and drawn again in backward
        (:mod:`pyro_sp.nn.regenerated_noise`), so the particles' weight noise and weights
        are never written (the weight gradients' per-particle products are, at most
        ``regenerated_noise.CHUNK_BYTES`` at a time); the other Bayesian tensors are drawn
        as usual. The same estimator, from
        another random generator: with the same noise (the seeds' noise written out),
        loss and gradients equal the stored-noise step's (tested in float64). Needs
        Triton; CPU tensors run in Triton's interpreter (for tests, slow).
    :param float init_scale: initial guide scale (as ``AutoNormal(init_scale=...)``).
    :param str init_loc: ``"module"``: guide means start at the network's own
        initial values (a trainable start); ``"zeros"``: at zero.
    :param SPMesh mesh: the process grid; default :func:`~pyro_sp.default_mesh`.
    :param int seed: seed of the per-rank particle streams (default: rank 0's
        :func:`torch.initial_seed`).
    :param bool compile: :func:`torch.compile` the step (one whole graph: its
        gradient buckets are reduced right after the compiled backward, unless
        ``split_compiled_graph=True``).
    :param bool cuda_graphs: with ``compile=True``, CUDA parameters and a one-process
        mesh, replay each training step as one CUDA graph
        (:mod:`~pyro_sp.nn.step_graph`): :meth:`step` records the compiled loss and
        backward, its gradients (the graph's own tensors, put in the optimizer's ``.grad``
        after each replay instead of zeroing and adding into them), and the optimizer's
        update when it is capturable (``torch.optim.Adam(..., capturable=True)``; otherwise, or with
        ``check="always"``, the update runs after the graph), and replays them with one
        launch. :meth:`loss_and_backward` records the loss and backward. The same kernels,
        noise and arithmetic as the compiled step without graphs: a step's key (input
        shapes, the addresses of the parameters, gradients and optimizer state, the
        optimizer's hyperparameters, the modules' training flags, the precision settings)
        runs once without a graph and is captured the next time it comes (two batch sizes
        taking turns are both captured); the graph reads the
        step's random stream when it is replayed. Checked on a GPU against the same
        compiled step without graphs (``tests/test_cuda_graphs.py``,
        ``benchmarks/graphs_check.py``). A new float learning rate is a new key: one step
        without a graph, then a capture, so a scheduler that changes it every step keeps
        every step off the graphs; a learning rate in a CUDA tensor
        (``lr=torch.tensor(1e-3, device="cuda")``), which schedulers update in place, keeps
        one graph. Optimizer hooks run when a graph is captured, not when it is replayed.
    :param str check: ``"first"``: the first step verifies on every rank
        that the ranks agree and none failed (one small collective), later
        steps run without host synchronisation; ``"always"``: every step
        does, and a non-finite loss raises on every rank.
    :param str gradient_sync: ``"bucketed"`` (reduction overlapped with
        backward) or ``"flat"`` (one all-reduce after backward; a failure in
        backward then rides in it as a flag instead of stopping the job).
    :param float bucket_cap_mb: gradient bucket size of the overlapped reduction.
    :param bool split_compiled_graph: with ``compile=True`` on a mesh, let
        :func:`torch.compile` split the graph at the gradient buckets (DDP's
        graph splitting) so that the reduction overlaps with the compiled
        backward. Off by default: on two H100s it made the Bayesian MLP's
        step slower (the split keeps more particle-sized tensors alive) than
        one whole graph whose buckets are reduced right after backward (see
        BENCHMARKS.md). Eager steps with ``gradient_sync="bucketed"`` always overlap.
    """

    def __init__(
        self,
        bnn: BayesianModule,
        likelihood: str | LogLikelihood = "categorical",
        *,
        num_particles: int,
        num_data: int | None = None,
        noise_scale: float = 1.0,
        kl: str = "analytic",
        estimator: str = "exact",
        precision: str = "fp32",
        weight_noise: str = "stored",
        init_scale: float = 0.01,
        init_loc: str = "module",
        mesh: SPMesh | None = None,
        seed: int | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        check: str = "first",
        gradient_sync: str = "bucketed",
        bucket_cap_mb: float = 25.0,
        split_compiled_graph: bool = False,
    ) -> None:
        super().__init__()
        self.mesh = default_mesh() if mesh is None else mesh
        if not isinstance(bnn, BayesianModule):
            raise TypeError(f"Expected a pyro_sp.nn.BayesianModule, got {type(bnn).__name__}.")
        if type(bnn).prior is not BayesianModule.prior:
            raise ValueError(
                f"Expected the default Normal priors, but {type(bnn).__name__} overrides prior(); "
                "use a Distributed…_ELBO with an autoguide for other priors."
            )
        if not isinstance(num_particles, int) or num_particles < self.mesh.sample:
            raise ValueError(
                f"Expected num_particles >= {self.mesh.sample} (the sample axis size), got "
                f"{num_particles!r}. Use more particles or a smaller sample axis."
            )
        if kl not in _KL:
            raise ValueError(f"Expected kl in {_KL}, got {kl!r}.")
        if precision not in _PRECISIONS:
            raise ValueError(f"Expected precision in {_PRECISIONS}, got {precision!r}.")
        if estimator not in ESTIMATORS:
            raise ValueError(f"Expected estimator in {ESTIMATORS}, got {estimator!r}.")
        if estimator == "local_reparam" and kl != "analytic":
            raise ValueError(
                f"Expected kl='analytic' with estimator='local_reparam', got kl={kl!r}: the local "
                "reparameterization draws pre-activations, not weights, so there is no weight draw to "
                "evaluate the sampled KL at. Pass kl='analytic', or estimator='flipout'."
            )
        if weight_noise not in _WEIGHT_NOISE:
            raise ValueError(f"Expected weight_noise in {_WEIGHT_NOISE}, got {weight_noise!r}.")
        if weight_noise == "regenerated":
            require_triton()
        if weight_noise == "regenerated" and estimator != "exact":
            raise ValueError(
                f"Expected estimator='exact' with weight_noise='regenerated', got estimator={estimator!r}: "
                "the regenerated noise is the exact estimator's weight draws, made inside the kernels."
            )
        if estimator != "exact" and bnn.dropout != "different":
            raise ValueError(
                f"Expected a BayesianModule with dropout='different' for estimator={estimator!r}, got "
                f"dropout={bnn.dropout!r}: the estimator's noise is drawn per particle like dropout masks."
            )
        if check not in _CHECK:
            raise ValueError(f"Expected check in {_CHECK}, got {check!r}.")
        if init_loc not in ("module", "zeros"):
            raise ValueError(f"Expected init_loc 'module' or 'zeros', got {init_loc!r}.")
        if not init_scale > 0:
            raise ValueError(f"Expected init_scale > 0, got {init_scale!r}.")
        if num_data is not None and (not isinstance(num_data, int) or num_data < 1):
            raise ValueError(f"Expected num_data to be a positive int or None, got {num_data!r}.")
        if gradient_sync not in GRADIENT_STRATEGIES:
            raise ValueError(f"Expected gradient_sync in {GRADIENT_STRATEGIES}, got {gradient_sync!r}.")
        self._loglik = log_likelihood(likelihood, noise_scale)
        self.gradient_sync = gradient_sync
        self.num_particles = num_particles
        self.num_data = num_data
        self.kl = kl
        self.check = check
        self.estimator = estimator
        self.precision = precision
        self.weight_noise = weight_noise
        self.posterior = _Posterior(bnn, init_scale, init_loc, estimator, weight_noise)
        if weight_noise == "regenerated" and not self.posterior.layers:
            raise ValueError(
                f"Expected a Linear layer with a Bayesian weight for weight_noise='regenerated', got none "
                f"among the Bayesian tensors {bnn.bayesian_names}. Use weight_noise='stored'."
            )
        if estimator != "exact" and not self.posterior.layers:
            raise ValueError(
                f"Expected a Linear{' or Conv2d' if estimator == 'flipout' else ''} layer with a Bayesian "
                f"weight for estimator={estimator!r}, "
                f"got none among the Bayesian tensors {bnn.bayesian_names}. Use estimator='exact'."
            )
        lo, hi = self.mesh.particle_share(num_particles)
        self.num_local = hi - lo
        self._steps = 0
        self._failure: str | None = None  # why this rank stopped the job's process groups
        self._validated = False  # per process: a resumed run checks its first step again
        group = None
        if self.mesh.is_distributed and self.mesh.world_size > 1:
            group = dist.group.WORLD
            shapes = [tuple(p.shape) for p in self.posterior.trainable()]
            # a function's repr holds its address, different in every process: use its name
            likelihood_name = likelihood if isinstance(likelihood, str) else getattr(
                likelihood, "__qualname__", type(likelihood).__qualname__)
            layout = {
                "num_particles": num_particles, "num_data": num_data, "kl": kl, "estimator": estimator,
                "precision": precision, "weight_noise": weight_noise, "likelihood": likelihood_name,
                "noise_scale": noise_scale, "mesh": (self.mesh.sample, self.mesh.data),
                "gradient_sync": gradient_sync, "cuda_graphs": bool(cuda_graphs),
                "parameters": list(zip(bnn.bayesian_names + bnn.deterministic_names, shapes)),
            }
            guarded(lambda: None, group=group, what="MeanFieldVI", device=self.mesh.device, layout=lambda _: layout)
            # every rank starts from rank 0's values, before any loss, prediction or step; through
            # the collective device (a module still on the CPU under NCCL is moved later by .to())
            values = [p.data for p in self.posterior.trainable()]
            moved = [v.to(self.mesh.device) for v in values]
            broadcast_tensors(moved, group=group)
            for v, m in zip(values, moved):
                if m is not v:
                    v.copy_(m)
        self._group = group
        seed = self.mesh.shared_seed(seed)
        self._seed = seed
        self._evals = 0  # loss() and predict() calls, apart from the training steps
        self._compile = compile
        if cuda_graphs and not compile:
            raise ValueError(
                f"Expected compile=True with cuda_graphs=True, got compile={compile!r}: the CUDA graphs "
                "replay the compiled step. Pass MeanFieldVI(..., compile=True, cuda_graphs=True)."
            )
        if cuda_graphs and group is not None:  # the same on every rank (checked in the layout above)
            raise ValueError(
                f"Expected a one-process mesh with cuda_graphs=True, got {self.mesh.world_size} processes: "
                "the graphs capture the whole step, and the gradient reduction with its failure checks "
                "is not replayed from a graph. Pass cuda_graphs=False on a mesh (compile=True still "
                "applies)."
            )
        self.cuda_graphs = bool(cuda_graphs)
        self._graphs = StepGraphs("MeanFieldVI") if cuda_graphs else None
        self._warned_optimizer = False
        self._no_gradient: set[int] = set()  # parameters the loss gives no gradient (graphs leave them None)
        if split_compiled_graph and bucket_cap_mb < 1:
            raise ValueError(
                f"Expected bucket_cap_mb >= 1 with split_compiled_graph=True (DDP's first bucket holds "
                f"1 MB and the split needs no smaller ones), got {bucket_cap_mb!r}."
            )
        self.bucket_cap_mb = float(bucket_cap_mb)
        self.split_compiled_graph = bool(split_compiled_graph)
        self._loss_fn = None

    # ---- random streams and checkpoints -------------------------------------------------
    @contextlib.contextmanager
    def _rng(self, purpose: str):
        """The particle noise of this rank's next training step (``purpose="step"``) or
        evaluation (``"eval"``): a stream seeded by (seed, purpose, rank, count), installed on
        the parameters' device. Training steps are counted apart from :meth:`loss` and
        :meth:`predict`, so evaluating on some ranks only cannot shift the training noise, and
        a checkpoint needs only the step count (:meth:`get_extra_state`) to resume exactly. Every
        call of the posterior runs inside it, so it also hands regenerated-noise layers torch's
        fp32 matmul precision."""
        count = self._steps if purpose == "step" else self._evals
        self._read_matmul_precision()
        if purpose != "step":
            self._evals += 1
        stream = RNGStream(self._stream_seed(purpose, count))
        device = self.posterior.locs[0].device
        with (torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()), stream:
            yield

    def _stream_seed(self, purpose: str, count: int) -> int:
        return stream_seed(self._seed, "mean_field_particles", purpose, self.mesh.rank, count)

    def _read_matmul_precision(self) -> str:
        """Hand torch's fp32 matmul setting to the regenerated-noise layers (read here: compiled
        code cannot) and return it."""
        precision = fp32_matmul_precision()
        for layer in self.posterior.regenerated_layers:
            layer.fp32_precision = precision
        return precision

    def get_extra_state(self) -> dict:
        """Saved in :meth:`state_dict`: the seed and the number of steps (the same on every
        rank, so rank 0's state dict resumes every rank exactly)."""
        return {"seed": self._seed, "steps": self._steps}

    def set_extra_state(self, state: dict) -> None:
        self._seed, self._steps = int(state["seed"]), int(state["steps"])

    # ---- setup ---------------------------------------------------------------------
    def _freeze_unused(self, x, y) -> None:
        """Leave out of training the parameters that get no gradient (as one process would: their
        ``.grad`` stays ``None``); DDP would otherwise wait for them and skip the reduction."""
        weight, ll_scale = self._scales(y)
        params = [p for p in self.posterior.trainable() if p.requires_grad]
        with self._rng("eval"):
            local = self.posterior(x, y, self.num_local, weight, ll_scale, self.kl, self._loglik, None,
                                   self.precision)
        grads = torch.autograd.grad(local, params, allow_unused=True)
        names = dict(zip(map(id, self.posterior.trainable()), self._parameter_names()))
        unused = [p for p, g in zip(params, grads) if g is None]
        if unused:
            warnings.warn(
                f"MeanFieldVI: {[names[id(p)] for p in unused]} get no gradient from the loss; they are "
                "left out of training and of the gradient reduction.", stacklevel=3,
            )
            for p in unused:
                p.requires_grad_(False)

    def _parameter_names(self) -> list[str]:
        bnn = self.posterior.bnn
        return ([f"loc of {n}" for n in bnn.bayesian_names] + [f"scale of {n}" for n in bnn.bayesian_names]
                + list(bnn.deterministic_names))

    def _setup(self, x, y) -> None:
        """On the first step: leave out parameters without gradient, set up the gradient
        strategy, compile. A failure on any rank is raised on every rank before the
        collectives of the bucketed reduction's construction."""
        # the same on every rank (one device type per job): raised by all before any collective
        if self.cuda_graphs and self.posterior.locs[0].device.type != "cuda":
            raise ValueError(
                f"Expected the parameters on a CUDA device with cuda_graphs=True, got "
                f"{self.posterior.locs[0].device}. Move the MeanFieldVI with .to('cuda'), or pass "
                "cuda_graphs=False."
            )
        module = self.posterior
        if self._group is not None:
            guarded(lambda: self._freeze_unused(x, y), group=self._group, what="MeanFieldVI's first step",
                    device=self.mesh.device)
            if self.gradient_sync == "bucketed":
                module = BucketedSum(module, group=self._group, bucket_cap_mb=self.bucket_cap_mb).module
        if self._compile:  # with cuda_graphs=True, the whole step is captured (step_graph)
            module = torch.compile(module)
        # a plain attribute, not a submodule: the state dict holds the parameters once
        object.__setattr__(self, "_loss_fn", module)

    # ---- the estimator -----------------------------------------------------------
    def _scales(self, y: torch.Tensor) -> tuple[float, float]:
        weight = 1.0 / (self.num_particles * self.mesh.data)
        ll_scale = 1.0 if self.num_data is None else self.num_data / y.shape[0]
        return weight, ll_scale

    def _local_loss(self, x, y, noise=None) -> torch.Tensor:
        with self._rng("step"):
            return self._call_loss(x, y, noise)

    def _call_loss(self, x, y, noise=None) -> torch.Tensor:
        """This rank's local loss on the current random stream."""
        weight, ll_scale = self._scales(y)
        with torch._dynamo.config.patch(optimize_ddp=self.split_compiled_graph):
            return self._loss_fn(x, y, self.num_local, weight, ll_scale, self.kl, self._loglik, noise,
                                 self.precision)

    def step(self, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *, noise=None) -> torch.Tensor:
        """
        One optimisation step on the minibatch ``(x, y)`` of this rank's data
        group: zero the gradients, loss, backward (gradients summed over the
        world while backward runs), ``optimizer.step()``.

        :param noise: this rank's standard-normal draws, one tensor of shape
            ``(num_local, *shape)`` per Bayesian tensor in
            ``bnn.bayesian_names`` order (for tests; with ``weight_noise="regenerated"``,
            the regenerated weights' entries are ``(num_local,)`` int64 seeds); default:
            drawn from this rank's stream.
        :returns: the global loss (a 0-d tensor, the same on every rank,
            reduced without blocking the host: read it when you log).
        """
        if self._graphs is not None and noise is None:
            return self._checked(lambda: self._graph_step(optimizer, x, y))
        optimizer.zero_grad(set_to_none=False)
        loss = self.loss_and_backward(x, y, noise=noise)
        optimizer.step()
        return loss

    def loss_and_backward(self, x: torch.Tensor, y: torch.Tensor, *, noise=None) -> torch.Tensor:
        """
        The loss and the gradients of the global estimator, added to the
        parameters' ``.grad``. Gradients already present are summed over the
        ranks too: zero them first (as :meth:`step` does).

        :returns: the global loss (0-d tensor).
        """
        if self._graphs is not None and noise is None:
            return self._checked(lambda: self._graph_step(None, x, y))
        return self._checked(lambda: self._loss_and_backward(x, y, noise))

    def _checked(self, run):
        """``run()`` unless an earlier step stopped the job; a failure that stops it is remembered."""
        if self._failure is not None:
            raise RuntimeError(
                f"MeanFieldVI cannot take step {self._steps + 1}: step {self._failure}; pyro_sp stopped "
                "the job's process groups so that no rank waits for the failed one. Restart the job "
                "(resume from a checkpoint)."
            )
        try:
            return run()
        except BaseException:
            if aborted():
                self._failure = f"{self._steps + 1} failed ({abort_reason()})"
            raise

    def _graph_step(self, optimizer, x, y) -> torch.Tensor:
        """One step (``optimizer`` given: with the zeroing and the update) replayed from a CUDA graph
        (:mod:`~pyro_sp.nn.step_graph`); one process, so no collective and no guard.

        With an optimizer the step's gradients start from zero, so the graph does not zero
        ``.grad`` and add into it: the gradients of the optimizer's parameters are the graph's own
        tensors, put in ``.grad`` after each replay (what the step without a graph computes as
        :math:`0 + g`; a replay writes them again, so ``.grad`` is not updated in place, and each
        kept graph holds a set of them). The optimizer's other gradients are zeroed; a parameter
        outside the optimizer accumulates, as ``backward`` makes it."""
        if self._loss_fn is None:
            self._setup(x, y)
        params = [p for p in self.posterior.trainable() if p.requires_grad]
        owned = frozenset() if optimizer is None else frozenset(
            id(p) for g in optimizer.param_groups for p in g["params"])
        created = set()
        for p in params:  # added into in place: at a fixed address
            if p.grad is None and id(p) not in self._no_gradient and id(p) not in owned:
                p.grad = torch.zeros_like(p)
                created.add(id(p))
        # the gradients the graph gives (known once the loss ran: a parameter may get none)
        given = frozenset(id(p) for p in params if id(p) in owned and id(p) not in self._no_gradient)
        # the update is in the graph unless it is not capturable or the loss is checked before it
        in_graph = optimizer is not None and capturable(optimizer) and self.check != "always"
        if optimizer is not None and not capturable(optimizer) and not self._warned_optimizer:
            self._warned_optimizer = True
            warnings.warn(
                f"MeanFieldVI(cuda_graphs=True): {type(optimizer).__name__} is not capturable, so its step "
                "runs after the graph, launched from the host. Pass capturable=True to a torch.optim "
                "optimizer (torch.optim.Adam(..., capturable=True)) to replay it in the graph too.",
                stacklevel=3,
            )
        key = self._step_key(x, y, params, optimizer if in_graph else None, optimizer is not None, given)

        def body(x, y):
            local = self._call_loss(x, y)
            grads = torch.autograd.grad(local, params, allow_unused=True)
            gives = []  # (parameter, its gradient): put in .grad after every run of the step
            for p, g in zip(params, grads):
                if g is None:  # no gradient from the loss: left without one, as backward leaves it
                    self._no_gradient.add(id(p))
                    if id(p) in created:
                        p.grad = None
                elif id(p) in owned:
                    gives.append((p, _as_grad(g, p)))
                else:
                    p.grad.add_(g)
            if optimizer is not None:  # what zero_grad leaves of the optimizer's other gradients: all
                # of them with the update in the graph; else those expected to be given (the rest: below)
                written = {id(p) for p, _ in gives}
                _zero_grads(optimizer, lambda i: i not in written and (in_graph or i in given))
            if in_graph:
                for p, g in gives:
                    p.grad = g
                optimizer.step()
            return local, tuple(gives)

        if optimizer is not None and not in_graph:  # the gradients the graph does not give
            _zero_grads(optimizer, lambda i: i not in given)
        before = [(p, p.grad) for p in params]
        try:
            loss, gives = self._graphs.run(key, body, (x, y), self._stream_seed("step", self._steps),
                                           lambda: self._rng("step"))
        except BaseException:  # e.g. a failed capture, which ran nothing: .grad as it was
            for p, g in before:
                p.grad = g
            raise
        for p, g in gives:
            p.grad = g
        self._steps += 1
        self._check_finite(loss)  # before the update, as without graphs
        if optimizer is not None and not in_graph:
            optimizer.step()
        return loss

    def _step_key(self, x, y, params, in_graph_optimizer, zeroes: bool, given: frozenset = frozenset()) -> tuple:
        """What a replayed step would read at a stale address or with a stale value
        (:mod:`~pyro_sp.nn.step_graph`): a graph is kept per key. The gradients the step gives
        (``given``, by ``id`` of their parameters) are written, not read: not in the key."""
        return (tensors_key([x, y], addresses=False), tensors_key(params),
                tensors_key([None if id(p) in given else p.grad for p in params]),
                optimizer_key(in_graph_optimizer, given), zeroes, tuple(m.training for m in self.modules()),
                self._read_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.is_autocast_enabled("cuda"),
                torch.get_autocast_dtype("cuda"), self.num_local, self.num_data, self.kl, self.precision)

    def _loss_and_backward(self, x, y, noise) -> torch.Tensor:
        if self._loss_fn is None:
            self._setup(x, y)
        what = f"MeanFieldVI's step {self._steps + 1}"
        validate = self.check == "always" or not self._validated
        group, flat = self._group, self.gradient_sync == "flat"
        # with the bucketed reduction, the others go on into backward's reduction: a failure in an
        # unchecked forward or in backward stops them at once (pyro_sp.distributed.failure)
        def stop_all():
            return failing_fast(what) if group is not None and not flat else contextlib.nullcontext()

        work = None
        if validate and group is not None:
            local, value = guarded(lambda: self._local_loss(x, y, noise), group=group, what=what,
                                   device=self.mesh.device, value=lambda t: t.detach())
            total = torch.tensor(value, dtype=local.dtype, device=local.device)
        else:
            with stop_all():
                local = self._local_loss(x, y, noise)
            total = local.detach().clone()
            if group is not None:
                work = recorded("loss_sum", dist.all_reduce, total, group=group, async_op=True)
        with stop_all():
            if flat and group is not None:
                error = None
                try:
                    local.backward()
                except Exception as e:  # noqa: BLE001 - raised on every rank by the reduction's flag
                    error = e
                params = [p for p in self.posterior.trainable() if p.requires_grad]
                reduced = all_reduce_gradients(params, [p.grad for p in params], group=group, error=error,
                                               what=what)
                for p, g in zip(params, reduced):
                    p.grad = g
            else:
                local.backward()
            if work is not None:
                work.wait()
        self._steps += 1
        self._validated = True
        self._check_finite(total)
        return total

    def _check_finite(self, loss: torch.Tensor) -> None:
        """With ``check="always"``, a non-finite global loss raises (the same on every rank)."""
        if self.check == "always" and not torch.isfinite(loss):
            raise FloatingPointError(
                f"MeanFieldVI's loss is {float(loss)} at step {self._steps} (on every rank). "
                "Lower the learning rate or init_scale, or check the data."
            )

    @torch.no_grad()
    def loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The global loss on ``(x, y)`` without gradients (a collective on a mesh)."""
        weight, ll_scale = self._scales(y)

        def local() -> float:
            with self._rng("eval"):
                return float(self.posterior(x, y, self.num_local, weight, ll_scale, self.kl, self._loglik, None,
                                            self.precision))

        # the loss sum and a failure flag in one all-reduce: a failure is an error on every rank
        return guarded(local, group=self._group, what="MeanFieldVI.loss", device=self.mesh.device,
                       value=lambda v: v)[1]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, num_samples: int) -> torch.Tensor | None:
        """
        Network outputs for ``num_samples`` posterior draws, split over the
        sample axis and gathered on every rank: shape ``(num_samples, batch, ...)``.
        Every rank of a sample group must pass the same ``x``.
        """
        if not isinstance(num_samples, int) or num_samples < self.mesh.sample:
            raise ValueError(f"Expected num_samples >= {self.mesh.sample}, got {num_samples!r}.")
        lo, hi = self.mesh.particle_share(num_samples)
        group = self.mesh.get_optional_group("sample")

        def local() -> torch.Tensor:
            with self._rng("eval"):
                return self.posterior.outputs(self.posterior.sample(hi - lo, None)[0], (x,), {})

        # checked before the gather, so that no rank waits in it for a failed one
        out, _ = guarded(local, group=group, what="MeanFieldVI.predict", device=self.mesh.device,
                         layout=lambda out: {"output shape": None if out is None else tuple(out.shape[1:])})
        return gather_rows([out], share_counts(num_samples, self.mesh.sample), group=group)[0]

    # ---- interoperation with Pyro -------------------------------------------------------
    def _store_names(self, prefix: str):
        site = self.posterior.bnn.name
        return (
            [(f"{prefix}.locs.{site}.{n}", f"{prefix}.scales.{site}.{n}") for n in self.posterior.names],
            [f"{site}.{n}" for n in self.posterior.bnn.deterministic_names],
        )

    @torch.no_grad()
    def to_param_store(self, prefix: str = "AutoNormal") -> None:
        """
        Write the guide into Pyro's param store under the names an
        ``AutoNormal`` guide (``prefix``) of the model would use, and the
        deterministic parameters under the model's names, so that Pyro's
        ``Predictive`` or :class:`~pyro_sp.DistributedPredictive` can use them.
        """
        store = pyro.get_param_store()
        bayes, fixed = self._store_names(prefix)
        for (loc_name, scale_name), loc, rho in zip(bayes, self.posterior.locs, self.posterior.rhos):
            for name, value, constraint in (
                (loc_name, loc, constraints.real),
                (scale_name, F.softplus(rho), constraints.softplus_positive),
            ):
                if name in store:
                    del store[name]
                store.setdefault(name, value.detach().clone(), constraint)
        for name, p in zip(fixed, self.posterior.fixed):
            if name in store:
                del store[name]
            store.setdefault(name, p.detach().clone())

    @torch.no_grad()
    def load_param_store(self, prefix: str = "AutoNormal") -> None:
        """Read an ``AutoNormal`` guide's (``prefix``) and the model's parameters from Pyro's param store."""
        store = pyro.get_param_store()
        bayes, fixed = self._store_names(prefix)
        wanted = [n for pair in bayes for n in pair] + fixed
        missing = [n for n in wanted if n not in store]
        if missing:
            raise KeyError(
                f"Expected the parameters {missing} in Pyro's param store (an AutoNormal guide "
                f"named {prefix!r} of the model, run once). Found: {sorted(store.keys())[:10]}..."
            )
        for (loc_name, scale_name), loc, rho in zip(bayes, self.posterior.locs, self.posterior.rhos):
            loc.copy_(store[loc_name])
            # from the (constrained) scale, whatever positive constraint the guide used
            rho.copy_(_inverse_softplus(store[scale_name].detach()))
        for name, p in zip(fixed, self.posterior.fixed):
            p.copy_(store[name])
