# SPDX-License-Identifier: Apache-2.0
"""Sampling-parallel estimators."""

from .distributed_elbo import DistributedELBO
from .trace_elbo import DistributedJitTrace_ELBO, DistributedTrace_ELBO
from .trace_mean_field_elbo import DistributedTraceMeanField_ELBO

__all__ = [
    "DistributedELBO",
    "DistributedJitTrace_ELBO",
    "DistributedTraceMeanField_ELBO",
    "DistributedTrace_ELBO",
]
