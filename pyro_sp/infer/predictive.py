# SPDX-License-Identifier: Apache-2.0
"""Posterior predictive sampling with the samples split over ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from pyro.infer import Predictive

from pyro_sp.distributed.collectives import gather_rows
from pyro_sp.distributed.guard import Agreement, guarded
from pyro_sp.distributed.failure import explained
from pyro_sp.distributed.fingerprint import data_fingerprint, describe_data
from pyro_sp.distributed.mesh import SPMesh, default_mesh, particle_share, share_counts
from pyro_sp.distributed.streams import RNGStream, draw_key, stream_seed

__all__ = ["DistributedPredictive"]

AXES = ("sample", "world")
GATHER = ("all", "rank0")


class DistributedPredictive(torch.nn.Module):
    """
    A drop-in for :class:`pyro.infer.Predictive` that splits ``num_samples``
    over the ranks of an axis, runs the stock (vectorized or sequential)
    ``Predictive`` on each rank's share with the rank's own random stream, and
    gathers the samples in order, so the result has the keys and shapes of
    Pyro's. Uneven shares are fine. ``Predictive`` uses no subsampling trick:
    each rank simply draws fewer samples.

    :param model, posterior_samples, guide, num_samples, return_sites, parallel:
        as in :class:`pyro.infer.Predictive`; ``posterior_samples`` are sliced,
        so sample ``k`` of the result belongs to posterior sample ``k``.
    :param SPMesh mesh: the process grid; default :func:`~pyro_sp.default_mesh`.
    :param str axis: ``"sample"`` (default) splits over the sample axis: each data
        group predicts for its own inputs. ``"world"`` splits over all ranks, for
        inference-only jobs where every rank passes the same inputs.
    :param str gather: ``"all"`` (default) gives every rank the whole result;
        ``"rank0"`` gives it to the first rank of the axis group only (the others
        get ``None``), to save memory.
    :param int seed: optional seed of fixed per-rank streams that ignore the
        global RNG. By default (``None``) randomness follows Pyro's semantics,
        as in the distributed estimators: each call draws one key from the
        global torch RNG (so :func:`pyro.set_rng_seed` reproduces it and
        successive calls differ) and every rank derives its own stream from
        the key. The ranks of an axis group must then hold the same global RNG
        state and pass the same inputs; a mismatch is a ``ValueError`` on
        every rank.

    Without a process group it is :class:`pyro.infer.Predictive`.
    """

    def __init__(
        self,
        model,
        posterior_samples=None,
        guide=None,
        num_samples=None,
        return_sites=(),
        parallel=False,
        *,
        mesh: SPMesh | None = None,
        axis: str = "sample",
        gather: str = "all",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if axis not in AXES:
            raise ValueError(f"Expected axis in {AXES}, got {axis!r}.")
        if gather not in GATHER:
            raise ValueError(f"Expected gather in {GATHER}, got {gather!r}.")
        posterior_samples = posterior_samples or {}
        sizes = {k: v.shape[0] for k, v in posterior_samples.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Expected posterior samples with one leading size, got {sizes}.")
        if sizes:
            num_samples = next(iter(sizes.values()))
        if num_samples is None:
            raise ValueError("Either posterior_samples or num_samples must be specified.")
        self.mesh = default_mesh() if mesh is None else mesh
        width = self.mesh.sample if axis == "sample" else self.mesh.world_size
        if num_samples < width:
            raise ValueError(
                f"Expected num_samples >= {width} (the size of the {axis!r} axis), got "
                f"{num_samples}. Draw more samples or split over a smaller axis."
            )
        self.model, self.guide = model, guide
        self.posterior_samples = posterior_samples
        self.num_samples = num_samples
        self.return_sites = return_sites
        self.parallel = parallel
        self.axis, self.gather, self.seed = axis, gather, seed
        self._rng: RNGStream | None = None

    def _local(self, lo: int, hi: int) -> Predictive:
        return Predictive(
            self.model,
            posterior_samples={k: v[lo:hi] for k, v in self.posterior_samples.items()},
            guide=self.guide,
            num_samples=hi - lo,
            return_sites=self.return_sites,
            parallel=self.parallel,
        )

    def forward(self, *args, **kwargs):
        mesh = self.mesh
        if not mesh.is_distributed:
            return self._local(0, self.num_samples)(*args, **kwargs)
        group = mesh.get_group(self.axis if self.axis == "sample" else "world")
        size, index = dist.get_world_size(group), dist.get_rank(group)
        device = mesh.device
        if self.seed is None:  # Pyro's semantics: one key per call from the global RNG
            key = draw_key()
            rng = RNGStream(stream_seed(key, "predictive", mesh.rank))
        else:
            if self._rng is None:
                self._rng = RNGStream(stream_seed(mesh.shared_seed(self.seed), "predictive", mesh.rank))
            key, rng = self.seed, self._rng
        # every rank of ``group`` predicts for the same inputs (one sample group on the
        # sample axis, everyone on the world axis): the check runs over ``group``, one slot
        fingerprint = data_fingerprint(args, kwargs, extra=(key,), device=device)
        lo, hi = particle_share(self.num_samples, size, index)
        def local():
            with rng:
                return self._local(lo, hi)(*args, **kwargs)

        def layout(samples):
            samples = samples or {}
            return {"num_samples": self.num_samples,
                    "sites": {k: (tuple(v.shape[1:]), str(v.dtype)) for k, v in sorted(samples.items())}}

        samples, _ = guarded(
            local, group=group, what="DistributedPredictive", device=device, layout=layout,
            agree=Agreement(  # every rank of ``group`` predicts for the same inputs: one slot
                fingerprint, label=mesh.data_index if self.axis == "sample" else 0,
                describe=lambda: {"random key of the call": key, **describe_data(args, kwargs)},
            ),
        )
        keys = sorted(samples)
        counts = share_counts(self.num_samples, size)
        with explained("DistributedPredictive"):
            gathered = gather_rows(
                [samples[k] for k in keys], counts, group=group, dst=0 if self.gather == "rank0" else None
            )
        return None if gathered is None else dict(zip(keys, gathered))
