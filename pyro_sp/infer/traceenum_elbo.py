# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

from pyro.infer import JitTraceEnum_ELBO, TraceEnum_ELBO

from .distributed_elbo import DistributedELBO

__all__ = ["DistributedJitTraceEnum_ELBO", "DistributedTraceEnum_ELBO"]


class DistributedTraceEnum_ELBO(DistributedELBO, TraceEnum_ELBO):
    """
    :class:`~pyro.infer.TraceEnum_ELBO` with the particle plate split over the
    sample axis. Enumerated dimensions sit left of the particle plate, which is
    just another plate in the tensor contraction: each rank contracts its
    particles, and the partial ELBOs add up.
    """

    _compilable = True


class DistributedJitTraceEnum_ELBO(DistributedELBO, JitTraceEnum_ELBO):
    """:class:`~pyro.infer.JitTraceEnum_ELBO`, sharded like :class:`DistributedTraceEnum_ELBO`."""
