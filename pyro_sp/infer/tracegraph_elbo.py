# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

import torch
from pyro.infer import JitTraceGraph_ELBO, TraceGraph_ELBO
from pyro.util import warn_if_nan

from .distributed_elbo import DistributedELBO

__all__ = ["DistributedJitTraceGraph_ELBO", "DistributedTraceGraph_ELBO"]

#: Prefix of the decaying-average baselines that TraceGraph_ELBO keeps in the param store.
BASELINE_PREFIX = "__baseline_avg_downstream_cost_"


class _TraceGraphMixin(DistributedELBO):
    def _is_local_param(self, name: str) -> bool:
        # The decaying-average baseline of a site has one entry per *local*
        # particle: per-rank state, never broadcast nor reduced. Each rank's
        # baseline is the slice of the single-process baseline for its particles.
        return name.startswith(BASELINE_PREFIX)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """
        The global loss, differentiable: its gradient is that of
        ``loss_and_grads`` (surrogate with downstream costs and baselines).
        Pyro's ``TraceGraph_ELBO`` has no such method; pyro_sp adds it so the
        module interface works.
        """
        return self._sharded(
            "differentiable_loss", self._local_differentiable_loss, model, guide, args, kwargs
        )

    def _local_differentiable_loss(self, model, guide, *args, **kwargs):
        elbo, surrogate_loss = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        loss = -(elbo.detach() if isinstance(elbo, torch.Tensor) else elbo)
        warn_if_nan(loss, "loss")
        if not isinstance(surrogate_loss, torch.Tensor):  # no sample site: Pyro's float
            return loss
        return loss + (surrogate_loss - surrogate_loss.detach())


class DistributedTraceGraph_ELBO(_TraceGraphMixin, TraceGraph_ELBO):
    """
    :class:`~pyro.infer.TraceGraph_ELBO`, sharded like
    :class:`~pyro_sp.DistributedTrace_ELBO`: the score-function terms use
    downstream costs and baselines exactly as in Pyro; the loss, the surrogate
    and the baseline loss are sums over particles, so they add up across ranks.

    Decaying-average baselines (``__baseline_avg_downstream_cost_*`` params,
    whose shape includes the local particle count) are per-rank state: they
    are excluded from parameter broadcast and gradient reduction, saved per
    rank in checkpoints, and put back before the re-run of a call in which
    parameters were first synchronised, so they are updated once per call.
    """


class DistributedJitTraceGraph_ELBO(_TraceGraphMixin, JitTraceGraph_ELBO):
    """:class:`~pyro.infer.JitTraceGraph_ELBO`, sharded like :class:`DistributedTraceGraph_ELBO`."""
