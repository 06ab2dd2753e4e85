# SPDX-License-Identifier: Apache-2.0
"""The distributed core of pyro_sp, shared by every path (the estimators,
``MeanFieldVI``, ``DistributedPredictive``, checkpoints, the data streams).

=================== =====================================================================
module              concept
=================== =====================================================================
``mesh``            :class:`SPMesh`: the degrees (sample × data) and this rank's
                    coordinates, stored at construction; particle shares
``launch``          :func:`init_mesh` from torchrun's environment (attempt-keyed store),
                    :func:`launch_module`
``teardown``        the clean exit at interpreter shutdown
``guard``           :func:`guarded` / :func:`step_check`: run locally, agree, raise the
                    same failure everywhere; :class:`RankError`
``failure``         stopping every rank where no collective can carry a failure (abort,
                    the store, the NCCL watchdog)
``fingerprint``     the data a sample group must agree on; :func:`rank_local`
``collectives``     broadcast, row gathers, small sums, the shared seed
``gradients``       the two gradient strategies: ``"flat"`` (:func:`all_reduce_gradients`)
                    and ``"bucketed"`` (:class:`BucketedSum`)
``record``          :func:`record_collectives`: every collective above goes through it
``streams``         every random stream's key (:data:`STREAMS`), :class:`RNGStream`
=================== =====================================================================
"""

from pyro_sp.distributed.collectives import all_reduce_sum, broadcast_tensors, gather_rows, shared_seed
from pyro_sp.distributed.fingerprint import rank_local
from pyro_sp.distributed.gradients import GRADIENT_STRATEGIES, BucketedSum, all_reduce_gradients
from pyro_sp.distributed.guard import RankError, guarded, layout_signature, step_check
from pyro_sp.distributed.launch import DEFAULT_TIMEOUT, init_mesh, launch_module
from pyro_sp.distributed.mesh import SPMesh, default_mesh, particle_share, share_counts
from pyro_sp.distributed.record import CollectiveRecord, record_collectives
from pyro_sp.distributed.streams import STREAMS, RNGStream, stream_seed

__all__ = [
    "DEFAULT_TIMEOUT",
    "GRADIENT_STRATEGIES",
    "STREAMS",
    "BucketedSum",
    "CollectiveRecord",
    "RNGStream",
    "RankError",
    "SPMesh",
    "all_reduce_gradients",
    "all_reduce_sum",
    "broadcast_tensors",
    "default_mesh",
    "gather_rows",
    "guarded",
    "init_mesh",
    "launch_module",
    "layout_signature",
    "particle_share",
    "rank_local",
    "record_collectives",
    "share_counts",
    "shared_seed",
    "step_check",
    "stream_seed",
]
