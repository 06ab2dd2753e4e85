# SPDX-License-Identifier: Apache-2.0
"""The 2-D process grid of sampling parallelism: a *sample* axis that splits
Monte Carlo particles and a *data* axis that splits minibatches.

Global rank ``r`` sits at data coordinate ``r // sample`` and sample
coordinate ``r % sample``: the ranks of one sample group are adjacent, so on
a multi-GPU host a sample group shares the fastest links.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pyro_sp.distributed.collectives import shared_seed
from pyro_sp.distributed.failure import check_not_aborted
from pyro_sp.distributed.teardown import register_teardown

__all__ = ["SPMesh", "default_mesh", "particle_share", "share_counts"]


def particle_share(num_particles: int, sample_size: int, sample_index: int) -> tuple[int, int]:
    """
    The half-open range ``[lo, hi)`` of particles held by one rank of the sample
    axis, following :func:`torch.tensor_split`: the first
    ``num_particles % sample_size`` ranks hold one particle more. With fewer
    particles than ranks (``num_particles < sample_size``) the last ranks hold
    none (``lo == hi == num_particles``).

    :param int num_particles: global number of particles :math:`N \\geq 1`.
    :param int sample_size: size :math:`S` of the sample axis.
    :param int sample_index: this rank's coordinate on the sample axis.
    :returns: ``(lo, hi)`` with ``hi - lo`` equal to :math:`\\lfloor N/S \\rfloor`
        or :math:`\\lceil N/S \\rceil`.
    """
    if not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 1:
        raise ValueError(
            f"Expected a positive integer num_particles, got {num_particles!r}."
        )
    if not 0 <= sample_index < sample_size:
        raise ValueError(
            f"Expected 0 <= sample_index < {sample_size}, got sample_index={sample_index}."
        )
    base, extra = divmod(num_particles, sample_size)
    lo = sample_index * base + min(sample_index, extra)
    hi = lo + base + (1 if sample_index < extra else 0)
    return lo, hi


@dataclass
class SPMesh:
    """
    The degrees of sampling parallelism (``sample``) and data parallelism
    (``data``) of a job of ``sample * data`` ranks, and the process groups that
    go with them.

    Built over an initialised default process group, or, when there is none,
    as the single-process mesh (``sample = data = 1``) on which every
    collective of pyro_sp is a no-op. Usually made by :func:`init_mesh`.

    The :class:`~torch.distributed.device_mesh.DeviceMesh` with axes
    ``("data", "sample")`` is built lazily, the first time a per-axis group
    is asked for.

    :param int sample: ranks that share one minibatch and split the particles.
    :param int data: ranks (sample groups) that see different minibatches.
    :param str device_type: device type of the :class:`DeviceMesh`
        (``"cuda"`` or ``"cpu"``); by default ``"cuda"`` under NCCL.
    """

    sample: int = 1
    data: int = 1
    device_type: str | None = None
    _device_mesh: object = field(default=None, init=False, repr=False, compare=False)
    _distributed: bool = field(default=False, init=False, repr=False, compare=False)
    _rank: int = field(default=0, init=False, repr=False, compare=False)
    _world: int = field(default=1, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # the process group and the coordinates are those of construction, stored: they stay
        # readable (for logging, file names) after a failure stopped the groups
        check_not_aborted()
        if dist.is_available() and dist.is_initialized():
            self._distributed, self._rank, self._world = True, dist.get_rank(), dist.get_world_size()
            register_teardown()
        for name, value in (("sample", self.sample), ("data", self.data)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"Expected positive integer mesh degrees, got sample={self.sample!r}, "
                    f"data={self.data!r} ({name} is invalid)."
                )
        world = self.world_size
        if self.sample * self.data != world:
            raise ValueError(
                f"Expected sample * data == world size, got sample={self.sample}, "
                f"data={self.data} (product {self.sample * self.data}) on world size "
                f"{world}. Choose degrees whose product is the number of ranks"
                + (
                    f", e.g. sample={self.sample}, data={world // self.sample}."
                    if world % self.sample == 0
                    else "."
                )
            )
        if self.device_type is None:
            backend = dist.get_backend() if self.is_distributed else "gloo"
            self.device_type = "cuda" if backend == "nccl" else "cpu"

    # ---- sizes and coordinates -------------------------------------------------
    @property
    def is_distributed(self) -> bool:
        """
        Whether the mesh was built over a process group (even of size one).

        :raises RuntimeError: after pyro_sp aborted the process groups to stop
            every rank after a failure (:mod:`pyro_sp.distributed.failure`): the mesh
            must not quietly become a single process.
        """
        if self._distributed:
            check_not_aborted()
        return self._distributed

    @property
    def world_size(self) -> int:
        """Number of ranks of the job (1 without a process group)."""
        return self._world

    @property
    def rank(self) -> int:
        """This process's global rank."""
        return self._rank

    @property
    def sample_index(self) -> int:
        """This rank's coordinate on the sample axis."""
        return self.rank % self.sample

    @property
    def data_index(self) -> int:
        """This rank's coordinate on the data axis: which minibatch stream it reads."""
        return self.rank // self.sample

    def particle_share(self, num_particles: int) -> tuple[int, int]:
        """This rank's particles ``[lo, hi)`` of ``num_particles`` (see :func:`particle_share`)."""
        return particle_share(num_particles, self.sample, self.sample_index)

    @property
    def device(self) -> torch.device:
        """The device this rank's collectives run on: its CUDA device under NCCL, else the CPU."""
        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def shared_seed(self, seed: int | None = None) -> int:
        """``seed``, or else rank 0's :func:`torch.initial_seed`, the same on every rank (collective)."""
        return shared_seed(seed, group=self.get_optional_group("world"), device=self.device)

    def data_shard(self) -> tuple[int, int]:
        """``(index, size)`` of this rank on the data axis: feed minibatch stream ``index`` of ``size``."""
        return self.data_index, self.data

    # ---- groups ----------------------------------------------------------------
    @property
    def device_mesh(self):
        """The :class:`~torch.distributed.device_mesh.DeviceMesh` with axes ``("data", "sample")``."""
        if not self.is_distributed:
            raise RuntimeError(
                "Expected an initialised process group to build a DeviceMesh, found none. "
                "Call pyro_sp.init_mesh() under torchrun."
            )
        if self._device_mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._device_mesh = init_device_mesh(
                self.device_type, (self.data, self.sample), mesh_dim_names=("data", "sample")
            )
        return self._device_mesh

    def get_group(self, axis: str):
        """The process group of ``axis`` (``"sample"``, ``"data"`` or ``"world"``) holding this rank."""
        if axis not in ("sample", "data", "world"):
            raise ValueError(f"Expected axis 'sample', 'data' or 'world', got {axis!r}.")
        if not self.is_distributed:
            raise RuntimeError(f"The single-process mesh has no {axis!r} group.")
        if axis == "world":
            return dist.group.WORLD
        return self.device_mesh.get_group(axis)

    def get_optional_group(self, axis: str):
        """Like :meth:`get_group`, but ``None`` on the single-process mesh."""
        return self.get_group(axis) if self.is_distributed else None

    def __repr__(self) -> str:
        return (
            f"SPMesh(sample={self.sample}, data={self.data}, rank={self.rank}, "
            f"coords=(data={self.data_index}, sample={self.sample_index}), "
            f"device_type={self.device_type!r})"
        )


def share_counts(total: int, parts: int) -> list[int]:
    """How many of ``total`` items each of ``parts`` ranks holds (see :func:`particle_share`)."""
    return [hi - lo for lo, hi in (particle_share(total, parts, i) for i in range(parts))]


def default_mesh() -> SPMesh:
    """
    The mesh used when none is given: every rank of the default process group
    on the sample axis, or the single-process mesh when there is no group.
    """
    if dist.is_available() and dist.is_initialized():
        return SPMesh(sample=dist.get_world_size(), data=1)
    return SPMesh()  # refuses to be built after an abort (SPMesh.__post_init__)
