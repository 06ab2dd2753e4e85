# SPDX-License-Identifier: Apache-2.0
"""The recorder of pyro_sp's collectives: every collective of every path goes
through :func:`recorded`, so :func:`record_collectives` sees all of them (the
step check, gradient reductions of both strategies, broadcasts, gathers, the
loss reductions and the shared seed)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["CollectiveRecord", "record_collectives", "recorded"]


@dataclass
class CollectiveRecord:
    """What :func:`record_collectives` saw: one ``(kind, bytes, seconds)`` per collective."""

    events: list[tuple[str, int, float]] = field(default_factory=list)

    def total(self, kind: str | None = None) -> tuple[int, int, float]:
        """``(count, bytes, seconds)`` of all events, or of one kind."""
        ev = [e for e in self.events if kind is None or e[0] == kind]
        return len(ev), sum(e[1] for e in ev), sum(e[2] for e in ev)


_RECORD: CollectiveRecord | None = None


@contextlib.contextmanager
def record_collectives() -> Iterator[CollectiveRecord]:
    """
    Record every collective of pyro_sp inside the block, by kind: the step
    check (``step_check``), both gradient strategies (``all_reduce_gradients``,
    ``bucketed_gradients``), parameter broadcasts, row gathers, small sums
    (``data_mean``, ``loss_sum``) and ``shared_seed``, with their payload and
    wall time (CUDA is synchronised around each one while recording, so the
    times are real but the overlap is lost; an asynchronous collective counts
    the time to launch it). Costs nothing when not recording.
    """
    global _RECORD
    previous, _RECORD = _RECORD, CollectiveRecord()
    try:
        yield _RECORD
    finally:
        _RECORD = previous


def recorded(kind: str, fn: Callable, tensor: torch.Tensor, **kwargs):
    """Run the collective ``fn(tensor, **kwargs)``, recorded as ``kind`` while :func:`record_collectives`
    is active. An asynchronous collective (``async_op=True``) is recorded with its bytes and the time
    to launch it; its returned work handle is passed back."""
    if _RECORD is None:
        return fn(tensor, **kwargs)
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    start = time.perf_counter()
    work = fn(tensor, **kwargs)
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    _RECORD.events.append((kind, tensor.numel() * tensor.element_size(), time.perf_counter() - start))
    return work
