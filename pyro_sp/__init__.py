# SPDX-License-Identifier: Apache-2.0
"""pyro_sp: sampling parallelism for Pyro.

Split the vectorized particles of an ELBO over ``torch.distributed`` ranks and
get exactly the single-process estimator back.
"""

from pyro_sp import data, distributed, nn, optim, poutine, uq
from pyro_sp.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pyro_sp.forecast import DistributedForecaster
from pyro_sp.infer import (
    CompileFallbackWarning,
    DistributedELBO,
    DistributedJitTrace_ELBO,
    DistributedJitTraceEnum_ELBO,
    DistributedJitTraceGraph_ELBO,
    DistributedJitTraceMeanField_ELBO,
    DistributedPredictive,
    DistributedRenyiELBO,
    DistributedTrace_ELBO,
    DistributedTraceEnum_ELBO,
    DistributedTraceGraph_ELBO,
    DistributedTraceMeanField_ELBO,
    DistributedTraceTailAdaptive_ELBO,
    DistributedTraceTMC_ELBO,
)
from pyro_sp.distributed import (
    RankError,
    RNGStream,
    SPMesh,
    default_mesh,
    init_mesh,
    particle_share,
    rank_local,
    record_collectives,
    share_counts,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CompileFallbackWarning",
    "DistributedELBO",
    "DistributedForecaster",
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
    "RNGStream",
    "RankError",
    "SPMesh",
    "__version__",
    "data",
    "default_mesh",
    "distributed",
    "init_mesh",
    "load_checkpoint",
    "nn",
    "optim",
    "particle_share",
    "poutine",
    "rank_local",
    "record_collectives",
    "save_checkpoint",
    "share_counts",
    "uq",
]
