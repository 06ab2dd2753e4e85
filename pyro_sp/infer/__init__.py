# SPDX-License-Identifier: Apache-2.0
"""Sampling-parallel estimators and predictive."""

from .compiled import CompileFallbackWarning
from .distributed_elbo import DistributedELBO
from .predictive import DistributedPredictive
from .renyi_elbo import DistributedRenyiELBO
from .trace_elbo import DistributedJitTrace_ELBO, DistributedTrace_ELBO
from .trace_mean_field_elbo import DistributedJitTraceMeanField_ELBO, DistributedTraceMeanField_ELBO
from .trace_tail_adaptive_elbo import DistributedTraceTailAdaptive_ELBO, tail_adaptive_weights
from .traceenum_elbo import DistributedJitTraceEnum_ELBO, DistributedTraceEnum_ELBO
from .tracegraph_elbo import DistributedJitTraceGraph_ELBO, DistributedTraceGraph_ELBO
from .tracetmc_elbo import DistributedTraceTMC_ELBO

__all__ = [
    "CompileFallbackWarning",
    "DistributedELBO",
    "DistributedJitTraceEnum_ELBO",
    "DistributedJitTraceGraph_ELBO",
    "DistributedJitTraceMeanField_ELBO",
    "DistributedJitTrace_ELBO",
    "DistributedPredictive",
    "DistributedRenyiELBO",
    "DistributedTraceEnum_ELBO",
    "DistributedTraceGraph_ELBO",
    "DistributedTraceMeanField_ELBO",
    "DistributedTraceTMC_ELBO",
    "DistributedTraceTailAdaptive_ELBO",
    "DistributedTrace_ELBO",
    "tail_adaptive_weights",
]
