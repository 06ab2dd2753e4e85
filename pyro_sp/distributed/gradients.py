# SPDX-License-Identifier: Apache-2.0
"""The two gradient strategies of pyro_sp, named and chosen explicitly.

Both give the *sum* over the world of the ranks' partial gradients, scaled:
the single-process gradient exactly, for any particle shares.

``"flat"`` (:func:`all_reduce_gradients`)
    After the backward pass: one all-reduce of a flat buffer per (dtype,
    device), in parameter-name order. It works on any set of tensors found at
    run time (Pyro's lazily created parameters), keeps a gradient that is
    missing on every rank ``None``, and carries a failure flag, so a rank that
    failed in its backward pass makes every rank raise. The estimators use it.

``"bucketed"`` (:class:`BucketedSum`)
    During the backward pass: the parameters of a fixed module are wrapped in
    :class:`~torch.nn.parallel.DistributedDataParallel` with a communication
    hook that *sums* its gradient buckets (DDP's default averages, exact
    only for equal shares); buckets are reduced while backward still runs,
    and the gradients are views of the buckets. It needs the parameter set
    fixed before the first step, as in ``MeanFieldVI``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from pyro_sp.distributed.collectives import buckets
from pyro_sp.distributed.guard import raise_failure
from pyro_sp.distributed.record import recorded

__all__ = ["GRADIENT_STRATEGIES", "BucketedSum", "all_reduce_gradients"]

#: The names of the gradient strategies.
GRADIENT_STRATEGIES = ("flat", "bucketed")


def all_reduce_gradients(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    *,
    group,
    scale: float = 1.0,
    error: BaseException | None = None,
    what: str = "The gradient all-reduce",
    hint: str = "",
) -> list[torch.Tensor | None]:
    """
    Sum ``grads`` over ``group`` and multiply by ``scale``, in one all-reduce
    of a flat buffer per (dtype, device).

    A missing gradient counts as zero; one flag per parameter rides along in
    the same buffer, so a gradient that is missing on *every* rank stays
    ``None`` (an optimizer then skips that parameter, as it would in one
    process). One more flag says whether a rank failed since the last check
    (``error``, e.g. in its backward pass): such a rank still joins the
    reduction (with zeros), and then every rank raises as in
    :func:`step_check`, so no rank waits for the collective timeout.

    :param params: parameters in the same (name) order on every rank.
    :param grads: this rank's gradient of each parameter, or ``None``.
    :param group: process group, or ``None`` for a no-op.
    :param float scale: factor applied after the sum (e.g. ``1 / data``).
    :param error: this rank's failure since the last check, or ``None``
        (its ``grads`` are then ignored).
    :param str what: the computation, named in the error.
    :param str hint: a sentence added to :class:`~pyro_sp.RankError`.
    :returns: the reduced gradients, views into the flat buffer.
    :raises RankError: on the ranks that did not fail, if some rank failed
        (the failing ranks re-raise their own exception).
    """
    if group is None:
        if error is not None:
            raise error
        return list(grads)
    if error is not None:
        if not params:  # the ranks agree on the parameters: with none, no rank waits for this one
            raise error
        grads = [None] * len(params)
    out: list[torch.Tensor | None] = [None] * len(params)
    failed = 0.0
    for k, ((dtype, device), idx) in enumerate(buckets(params).items()):
        parts, flags = [], []
        for i in idx:
            g = grads[i]
            parts.append(torch.zeros_like(params[i]) if g is None else g.detach())
            flags.append(0.0 if g is None else 1.0)
        if k == 0:  # the failure flag rides in the first buffer
            flags.append(float(error is not None))
        parts.append(torch.tensor(flags, dtype=dtype, device=device))
        flat = _flatten_dense_tensors(parts)
        recorded("all_reduce_gradients", dist.all_reduce, flat, group=group)
        if scale != 1.0:
            flat.mul_(scale)
        reduced = _unflatten_dense_tensors(flat, parts)
        present = reduced[-1].tolist()
        if k == 0:
            failed = present.pop()
        for i, g, flag in zip(idx, reduced, present):
            out[i] = g if flag != 0 else None
    if failed:
        raise_failure(error, what, hint, group, dist.get_world_size(group))
    return out


def _sum_hook(group, bucket):
    """DDP communication hook: the SUM of the ranks' gradient bucket, not their mean (recorded)."""
    work = recorded("bucketed_gradients", dist.all_reduce, bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def ddp_without_buffer_sync() -> dict:
    """DDP keyword arguments that turn off the per-forward buffer broadcast (named
    ``forward_sync_buffers`` in recent PyTorch, ``broadcast_buffers`` before)."""
    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


class BucketedSum:
    """
    The ``"bucketed"`` strategy: ``module``'s gradients summed over ``group``
    in buckets while the backward pass runs (DDP with a summing hook, the
    gradients views of the buckets). Call the wrapped module,
    :attr:`module`, in place of ``module``; its parameters that need a
    gradient must all get one from every step's loss (leave the others out
    with ``requires_grad_(False)`` first).

    :param torch.nn.Module module: the module whose parameters are reduced.
    :param group: the process group (every rank of it takes every step).
    :param float bucket_cap_mb: bucket size.
    """

    def __init__(self, module: torch.nn.Module, *, group, bucket_cap_mb: float = 25.0) -> None:
        from torch.nn.parallel import DistributedDataParallel

        device = next(module.parameters()).device
        self.module = DistributedDataParallel(
            module,
            device_ids=[device] if device.type == "cuda" else None,
            **ddp_without_buffer_sync(),
            bucket_cap_mb=bucket_cap_mb,
            gradient_as_bucket_view=True,
        )
        self.module.register_comm_hook(group, _sum_hook)
