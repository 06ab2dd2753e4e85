# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

import warnings

import torch
from pyro.infer import TraceTailAdaptive_ELBO
from pyro.infer.util import check_fully_reparametrized, is_validation_enabled

from .distributed_elbo import DistributedELBO

__all__ = ["DistributedTraceTailAdaptive_ELBO", "tail_adaptive_weights"]

RANKS = ("pyro", "tail")


def tail_adaptive_weights(log_pq: torch.Tensor, beta: float, ranks: str = "pyro") -> torch.Tensor:
    """
    Unnormalised particle weights :math:`\\gamma_k` of the tail-adaptive
    f-divergence, from the log importance ratios of *all* particles.

    - ``ranks="tail"``: the estimator of Wang, Liu and Liu (2018):
      :math:`\\gamma_k = \\hat F(w_k)^\\beta` with the empirical tail
      probability :math:`\\hat F(w_k) = \\frac1N \\#\\{j : w_j \\ge w_k\\}`
      (the constant :math:`1/N` cancels in the normalisation and is dropped).
      With :math:`\\beta < 0` the particles with the largest weights count most.
    - ``ranks="pyro"``: what Pyro 1.9's ``TraceTailAdaptive_ELBO`` computes,
      :math:`\\gamma_k = (\\mathrm{argsort}(\\log w)_k + 1)^\\beta`: the
      position of the :math:`k`-th smallest particle, not a rank of particle
      :math:`k` (pyro-ppl/pyro#3170).

    :param torch.Tensor log_pq: shape ``(N,)``.
    :param float beta: the exponent, ``-1 <= beta < 0``.
    :param str ranks: ``"pyro"`` or ``"tail"``.
    """
    if ranks not in RANKS:
        raise ValueError(f"Expected ranks in {RANKS}, got {ranks!r}.")
    log_pq = log_pq.detach()
    n = log_pq.shape[0]
    if ranks == "pyro":
        order = torch.argsort(log_pq, descending=False)
        rank = torch.index_select(torch.arange(n, device=log_pq.device) + 1, -1, order)
    else:
        smaller = torch.searchsorted(torch.sort(log_pq).values, log_pq, right=False)
        rank = n - smaller  # number of particles with a log-ratio >= this one's
    return torch.pow(rank.type_as(log_pq), beta)


class DistributedTraceTailAdaptive_ELBO(DistributedELBO, TraceTailAdaptive_ELBO):
    """
    :class:`~pyro.infer.TraceTailAdaptive_ELBO` with its particles split over
    the sample axis. The particle weights depend on the ranks of
    :math:`\\log p/q` among *all* particles, so the detached log-ratios are
    all-gathered over the sample axis (one number per particle); each rank then
    weights its own particles and the surrogates sum-reduce.

    :param str ranks: ``"pyro"`` (default) reproduces Pyro 1.9 exactly,
        including its ranking (pyro-ppl/pyro#3170), so the class is a drop-in;
        ``"tail"`` uses the tail-probability ranks of the paper
        (see :func:`tail_adaptive_weights`). The default follows Pyro because
        a drop-in must give the same gradients; choose ``"tail"`` for the
        method as published.

    Like Pyro's, it has no ``loss`` (the divergence itself is not estimated),
    needs ``vectorize_particles=True`` and fully reparameterized guides.
    """

    _linear = False

    def __init__(self, num_particles: int | None = None, *, ranks: str = "pyro", **kwargs) -> None:
        if ranks not in RANKS:
            raise ValueError(f"Expected ranks in {RANKS}, got {ranks!r}.")
        super().__init__(num_particles=num_particles, **kwargs)
        self.ranks = ranks

    def loss(self, model, guide, *args, **kwargs):
        raise NotImplementedError("Loss method for TraceTailAdaptive_ELBO not implemented")

    def loss_and_grads(self, model, guide, *args, **kwargs):
        if not self.mesh.is_distributed and self.ranks == "pyro":
            return TraceTailAdaptive_ELBO.loss_and_grads(self, model, guide, *args, **kwargs)
        return self._sharded("loss_and_grads", self._log_pq, model, guide, args, kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        if not self.mesh.is_distributed and self.ranks == "pyro":
            return TraceTailAdaptive_ELBO.differentiable_loss(self, model, guide, *args, **kwargs)
        return self._sharded("differentiable_loss", self._log_pq, model, guide, args, kwargs)

    def _log_pq(self, model, guide, *args, **kwargs):
        """:math:`\\log p - \\log q` of each of this rank's particles, shape ``(n_local,)``."""
        if not self.vectorize_particles:
            raise NotImplementedError(
                "TraceTailAdaptive_ELBO only implemented for vectorize_particles==True"
            )
        if self.num_particles == 1:
            warnings.warn(
                "For num_particles==1 TraceTailAdaptive_ELBO uses the same loss function as "
                "Trace_ELBO. Increase num_particles to get an adaptive f-divergence."
            )
        lo, hi = self._share if self._share is not None else (0, self.num_particles)
        (model_trace, guide_trace), = self._get_traces(model, guide, args, kwargs)
        log_p, log_q = 0.0, 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                log_p = log_p + site["log_prob"].reshape(hi - lo, -1).sum(-1)
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                log_q = log_q + site["log_prob"].reshape(hi - lo, -1).sum(-1)
                if is_validation_enabled():
                    check_fully_reparametrized(site)
        return log_p - log_q

    def _combine(self, kind, log_pq):
        if self._call is not None and self._call.empty:  # a stand-in particle: no rows, no gradient
            log_pq = log_pq[:0]
        lo, hi = (self._call.lo, self._call.hi) if self._call is not None else (0, self.num_particles)
        gamma = tail_adaptive_weights(
            self._gather_particles(log_pq.detach()), self.tail_adaptive_beta, self.ranks
        )
        # Pyro's Trace_ELBO machinery divides the particle surrogate by num_particles
        surrogate_loss = -(log_pq * gamma[lo:hi]).sum() / gamma.sum() / self.num_particles
        loss = float("inf")  # the divergence itself is not estimated
        if kind == "loss_and_grads":
            if surrogate_loss.requires_grad:
                surrogate_loss.backward(retain_graph=self.retain_graph)
            return loss, None
        return loss, loss + (surrogate_loss - surrogate_loss.detach())
