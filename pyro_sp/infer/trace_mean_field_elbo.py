# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

from pyro.infer import JitTraceMeanField_ELBO, TraceMeanField_ELBO

from .distributed_elbo import DistributedELBO

__all__ = ["DistributedJitTraceMeanField_ELBO", "DistributedTraceMeanField_ELBO"]


class DistributedTraceMeanField_ELBO(DistributedELBO, TraceMeanField_ELBO):
    """
    :class:`~pyro.infer.TraceMeanField_ELBO` (analytic KL between guide and
    prior where it is known), sharded like
    :class:`~pyro_sp.infer.DistributedTrace_ELBO`. The cheap path for
    Bayesian neural networks with mean-field guides: the KL terms need no
    particles, the likelihood uses this rank's share.
    """

    _compilable = True


class DistributedJitTraceMeanField_ELBO(DistributedELBO, JitTraceMeanField_ELBO):
    """:class:`~pyro.infer.JitTraceMeanField_ELBO`, sharded like :class:`DistributedTraceMeanField_ELBO`."""
