# SPDX-License-Identifier: Apache-2.0
"""Minibatch indices sharded over the data axis of an :class:`~pyro_sp.SPMesh`."""

from __future__ import annotations

import math

import torch

from pyro_sp.distributed.mesh import SPMesh, default_mesh
from pyro_sp.distributed.streams import stream_seed

__all__ = ["ShardedBatchSampler"]


class ShardedBatchSampler:
    """
    Index batches for one data group: each epoch a permutation of all
    ``num_items`` is drawn from ``seed`` and the epoch (the same on every
    rank), cut into one contiguous shard per data group (disjoint, covering
    the data set, sizes differing by at most one), and each shard into the
    same number of batches, so every rank takes the same number of steps.
    All ranks of a sample group get identical batches.

    :param int num_items: size of the data set.
    :param int batch_size: the largest batch of a data group (one more item
        only when a shard has fewer items than there are batches).
    :param SPMesh mesh: the process grid.
    :param int seed: seed of the epoch permutations.
    :param bool shuffle: draw a new permutation every epoch (else the identity).
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        mesh: SPMesh | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.mesh = default_mesh() if mesh is None else mesh
        if batch_size < 1:
            raise ValueError(f"Expected batch_size >= 1, got {batch_size}.")
        if num_items < self.mesh.data:
            raise ValueError(
                f"Expected at least one item per data group, got {num_items} items for "
                f"{self.mesh.data} data groups."
            )
        self.num_items, self.batch_size = num_items, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (call it before iterating, as with DistributedSampler)."""
        self.epoch = epoch

    def __len__(self) -> int:
        largest_shard = math.ceil(self.num_items / self.mesh.data)
        smallest_shard = self.num_items // self.mesh.data
        # never more batches than the smallest shard has items (no empty batch); in
        # that corner a batch of the largest shard may hold one item more than batch_size
        return min(math.ceil(largest_shard / self.batch_size), smallest_shard)

    def shard(self) -> torch.Tensor:
        """This data group's indices for the current epoch."""
        if self.shuffle:
            g = torch.Generator().manual_seed(stream_seed(self.seed, "epoch", self.epoch))
            order = torch.randperm(self.num_items, generator=g, device="cpu")
        else:
            order = torch.arange(self.num_items, device="cpu")
        return order.tensor_split(self.mesh.data)[self.mesh.data_index]

    def __iter__(self):
        yield from self.shard().tensor_split(len(self))
