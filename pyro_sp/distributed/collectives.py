# SPDX-License-Identifier: Apache-2.0
"""The data collectives of pyro_sp: broadcast of parameters and buffers,
gathers of per-particle rows, sums of small values and the shared seed.
Gradients are :mod:`pyro_sp.distributed.gradients`'; the per-step agreement
is :mod:`pyro_sp.distributed.guard`'s.

Every helper takes the process group explicitly; with ``group=None`` it is a
no-op, so the same code runs in a plain single-process test. Every collective
goes through :func:`~pyro_sp.distributed.record.recorded`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from pyro_sp.distributed.record import recorded

__all__ = ["all_reduce_sum", "broadcast_tensors", "buckets", "gather_rows", "shared_seed"]


def buckets(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``tensors`` grouped by (dtype, device), in the given order."""
    buckets: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    return buckets

def broadcast_tensors(tensors: Sequence[torch.Tensor], *, group, src: int = 0) -> None:
    """
    Overwrite ``tensors`` in place with rank ``src``'s values: one broadcast of
    a flat buffer per (dtype, device).

    Rank ``src`` writes nothing, and the others write through ``.data``: no
    version counter moves, so autograd graphs that the caller built from these
    tensors before stay usable (on ``src`` they are exactly as they were).

    :param tensors: the same tensors, in the same order, on every rank.
    :param group: process group, or ``None`` for a no-op.
    :param int src: global rank that holds the values to keep.
    """
    if group is None or not tensors:
        return
    with torch.no_grad():
        for idx in buckets(tensors).values():
            part = [tensors[i] for i in idx]
            flat = _flatten_dense_tensors([t.detach() for t in part])
            recorded("broadcast", dist.broadcast, flat, src=src, group=group)
            if dist.get_rank() == src:
                continue
            for t, v in zip(part, _unflatten_dense_tensors(flat, part)):
                t.data.copy_(v)

def gather_rows(
    tensors: Sequence[torch.Tensor],
    counts: Sequence[int],
    *,
    group,
    dst: int | None = None,
) -> list[torch.Tensor] | None:
    """
    Concatenate, along dim 0 and in group-rank order, every rank's rows of
    each tensor: rank ``i`` of ``group`` holds ``counts[i]`` rows (uneven
    counts are padded for transport and trimmed). One all-gather (or gather)
    per (dtype, device).

    :param tensors: this rank's tensors, each of shape ``(counts[i], *rest)``;
        ``rest`` and the dtypes must agree across ranks.
    :param counts: the row count of every rank of ``group``.
    :param group: process group, or ``None`` (returns ``tensors``).
    :param int dst: group rank that receives the result; ``None`` for all.
    :returns: the gathered tensors (``None`` on ranks other than ``dst``).
    """
    if group is None:
        return list(tensors)
    size = dist.get_world_size(group)
    me = dist.get_rank(group)
    if len(counts) != size:
        raise ValueError(f"Expected {size} row counts (one per rank), got {len(counts)}.")
    rows, total = max(counts), sum(counts)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for (dtype, device), idx in buckets(tensors).items():
        transport = torch.uint8 if dtype == torch.bool else dtype
        cols = [
            tensors[i].reshape(counts[me], math.prod(tensors[i].shape[1:])).to(transport) for i in idx
        ]
        widths = [c.shape[1] for c in cols]
        flat = torch.zeros(rows, sum(widths), dtype=transport, device=device)
        flat[: counts[me]] = torch.cat(cols, dim=1)
        if dst is None:
            parts = [torch.empty_like(flat) for _ in range(size)]
            recorded("all_gather_rows", lambda t, **kw: dist.all_gather(parts, t, **kw), flat, group=group)
        else:
            parts = [torch.empty_like(flat) for _ in range(size)] if me == dst else None
            root = dist.get_global_rank(group, dst)
            recorded("gather_rows", lambda t, **kw: dist.gather(t, parts, dst=root, **kw), flat, group=group)
            if me != dst:
                continue
        full = torch.cat([part[:c] for part, c in zip(parts, counts)], dim=0)
        for i, piece in zip(idx, full.split(widths, dim=1)):
            out[i] = piece.reshape((total,) + tuple(tensors[i].shape[1:])).to(dtype)
    return out if dst is None or me == dst else None


def all_reduce_sum(values: Sequence[float], *, group, device, kind: str) -> list[float]:
    """The sums over ``group`` of a few host values (float64), in one all-reduce recorded as ``kind``."""
    if group is None:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    recorded(kind, dist.all_reduce, t, group=group)
    return t.tolist()


def shared_seed(seed: int | None, *, group, device) -> int:
    """``seed``, or else the group's first rank's :func:`torch.initial_seed`, the same on every rank."""
    if seed is not None:
        return int(seed)
    if group is None:
        return torch.initial_seed()
    t = torch.tensor([torch.initial_seed() % (1 << 62)], dtype=torch.int64, device=device)
    recorded("shared_seed", dist.broadcast, t, src=dist.get_global_rank(group, 0), group=group)
    return int(t.item())
