# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

from pyro.infer import TraceTMC_ELBO

from .distributed_elbo import DistributedELBO

__all__ = ["DistributedTraceTMC_ELBO"]


class DistributedTraceTMC_ELBO(DistributedELBO, TraceTMC_ELBO):
    """
    :class:`~pyro.infer.TraceTMC_ELBO` with its ``num_particles`` repetitions
    split over the sample axis. The tensor Monte Carlo samples of each site
    (``infer={"num_samples": k}``) are enumerated dimensions inside one
    particle; they are drawn from the rank's own particle stream.
    """
