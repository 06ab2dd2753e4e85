# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

import math

import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer import RenyiELBO
from pyro.infer.util import get_dependent_plate_dims, torch_sum
from pyro.util import warn_if_nan

from .distributed_elbo import DistributedELBO

__all__ = ["DistributedRenyiELBO"]


class DistributedRenyiELBO(DistributedELBO, RenyiELBO):
    """
    :class:`~pyro.infer.RenyiELBO` (:math:`\\alpha = 0` is the IWAE bound) with
    its particles split over the sample axis.

    The bound is nonlinear across particles:

    .. math::

        \\mathcal{L}_\\alpha = \\frac{1}{1 - \\alpha} \\log \\frac{1}{N}
            \\sum_{k=1}^{N} w_k, \\qquad
        \\log w_k = (1 - \\alpha) \\big[\\log p(x, z_k) - \\log q(z_k)\\big].

    Each rank computes the log-weights of its particles, the detached
    log-weights (one number per particle and independent batch element) are
    all-gathered over the sample axis, and every rank forms the global
    :math:`\\log \\frac1N \\sum_k w_k` and the normalised weights
    :math:`\\bar w_k = w_k / \\frac1N\\sum_j w_j` of its own particles. The
    surrogate :math:`\\frac1N \\sum_{k\\,\\mathrm{local}} \\bar w_k\\, s_k` is then
    linear again, and its gradients sum-reduce. Because pyro_sp removes the
    particle plate's subsampling scale, no :math:`N/n` factor enters the
    log-weights. With a data axis, each data group's bound is formed from its
    own minibatch and the loss and gradients are averaged over the groups.

    Without a process group, Pyro's ``RenyiELBO`` runs untouched.
    """

    _linear = False

    def loss(self, model, guide, *args, **kwargs):
        if not self.mesh.is_distributed:
            return RenyiELBO.loss(self, model, guide, *args, **kwargs)
        return self._sharded("loss", self._particle_elbos_no_grad, model, guide, args, kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        if not self.mesh.is_distributed:
            return RenyiELBO.loss_and_grads(self, model, guide, *args, **kwargs)
        return self._sharded("loss_and_grads", self._particle_elbos, model, guide, args, kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        raise NotImplementedError(
            "RenyiELBO has no differentiable_loss in Pyro; use loss_and_grads (SVI)."
        )

    def _particle_elbos_no_grad(self, model, guide, *args, **kwargs):
        with torch.no_grad():
            return self._particle_elbos(model, guide, *args, **kwargs)

    def _particle_elbos(self, model, guide, *args, **kwargs):
        """Per-particle ELBO terms and surrogate terms of this rank (Pyro's estimator, before the weights)."""
        elbos, surrogates = [], []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo, surrogate = 0.0, 0.0
            sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
            for site in model_trace.nodes.values():
                if site["type"] == "sample":
                    log_prob_sum = torch_sum(site["log_prob"], sum_dims)
                    elbo = elbo + log_prob_sum.detach()
                    surrogate = surrogate + log_prob_sum
            for site in guide_trace.nodes.values():
                if site["type"] == "sample":
                    _, score_function_term, entropy_term = site["score_parts"]
                    log_prob_sum = torch_sum(site["log_prob"], sum_dims)
                    elbo = elbo - log_prob_sum.detach()
                    if not is_identically_zero(entropy_term):
                        surrogate = surrogate - log_prob_sum
                        if not is_identically_zero(score_function_term):
                            raise NotImplementedError(  # as in Pyro (pyro-ppl/pyro#1222)
                                "RenyiELBO does not support partially reparameterized sites."
                            )
                    if not is_identically_zero(score_function_term):
                        surrogate = surrogate + (self.alpha / (1.0 - self.alpha)) * log_prob_sum
            elbos.append(elbo)
            surrogates.append(surrogate)
        vectorized = self.vectorize_particles and self.num_particles > 1
        if vectorized:
            return elbos[0], surrogates[0]
        return torch.stack(elbos), torch.stack(surrogates)

    def _combine(self, kind, payload):
        elbo_particles, surrogate_particles = payload
        if self._call is not None and self._call.empty:  # a stand-in particle: no rows, no gradient
            elbo_particles, surrogate_particles = elbo_particles[:0], surrogate_particles[:0]
        log_weights = (1.0 - self.alpha) * elbo_particles
        all_log_weights = self._gather_particles(log_weights.detach())
        log_mean_weight = torch.logsumexp(all_log_weights, dim=0, keepdim=True) - math.log(
            self.num_particles
        )
        loss = -log_mean_weight.sum().item() / (1.0 - self.alpha)
        warn_if_nan(loss, "loss")
        if kind == "loss_and_grads" and getattr(surrogate_particles, "requires_grad", False):
            normalized_weights = (log_weights - log_mean_weight).exp()
            surrogate_elbo = (normalized_weights * surrogate_particles).sum() / self.num_particles
            (-surrogate_elbo).backward()
        return loss, None
