# SPDX-License-Identifier: Apache-2.0
"""The one timing loop of the benchmarks: every suite of :mod:`pyro_sp.bench`
and every script in the source tree's ``benchmarks/`` that times steps calls
:func:`step_times` (or :func:`timed`, its summary).

A step is any callable. The loop runs ``warmup`` untimed calls, then ``steps``
timed ones; each timed call is synchronised before and after (CUDA: the
device; JAX: ``wait=jax.block_until_ready`` on the step's result), so a time
is the step's own work, not the launch of its kernels. On CUDA the peak
memory allocated over the timed calls is reported too.

:func:`collectives_per_step` is the accounting that goes with a time: every
collective of pyro_sp that :func:`~pyro_sp.distributed.record.record_collectives`
saw over some steps, by kind (:data:`COLLECTIVE_KINDS`).

This module imports nothing of pyro_sp at import time, so a script that
measures an *older* pyro_sp (``benchmarks/failure_cost.py``) can load it by
its path.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["COLLECTIVE_KINDS", "back_to_back_times", "collectives_per_step", "step_times", "synchronize", "timed"]

#: Every kind of collective that :func:`pyro_sp.distributed.record.recorded` names: the
#: step check, both gradient strategies, parameter broadcasts, row gathers, small sums
#: and the shared seed. :func:`collectives_per_step` lists each, zero where none ran.
COLLECTIVE_KINDS = (
    "step_check",
    "all_reduce_gradients",
    "bucketed_gradients",
    "broadcast",
    "all_gather_rows",
    "gather_rows",
    "data_mean",
    "loss_sum",
    "shared_seed",
)


def synchronize(device: torch.device | None) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing elsewhere."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(
    step: Callable[[], object],
    *,
    steps: int,
    warmup: int = 0,
    device: torch.device | None = None,
    wait: Callable[[object], object] | None = None,
    before: Callable[[], object] | None = None,
    events: bool = False,
) -> tuple[list[float], float | None]:
    """
    Run ``step`` ``warmup`` times untimed, then ``steps`` times timed.

    :param step: one step (its return value is passed to ``wait``).
    :param int steps: timed calls.
    :param int warmup: untimed calls first (compilation, allocator, caches).
    :param torch.device device: synchronised around each timed call (CUDA), and
        the device whose peak memory is reported.
    :param wait: called with each step's result until its work is done (e.g.
        ``jax.block_until_ready``).
    :param before: called before each timed call, outside the timed interval
        (e.g. ``torch.distributed.barrier``, so the ranks start a step together).
    :param bool events: time each call with CUDA events recorded around it on the current
        stream (the device's time for the queued work, not the host's launch of it: for single
        kernels); CUDA ``device`` only.
    :returns: the seconds of each timed call, and the peak memory over them in
        GiB (CUDA ``device``; else ``None``): the peak allocated, plus what the pools of the CUDA
        graphs captured during the call hold beyond it (:func:`graph_pool_bytes`).
    """
    times, peak, _ = _step_times(step, steps=steps, warmup=warmup, device=device, wait=wait, before=before,
                                 events=events)
    return times, peak


def _step_times(step, *, steps, warmup=0, device=None, wait=None, before=None,
                events=False) -> tuple[list[float], float | None, int]:
    """:func:`step_times`, and the bytes of the CUDA graph pools made during it."""
    cuda = device is not None and device.type == "cuda"
    if events and not cuda:
        raise ValueError(f"Expected a CUDA device with events=True (CUDA events time the device), got {device}.")
    pools = 0
    if cuda:  # what earlier steps' dead graphs left is released, so that only this step's pools count
        gc.collect()
        torch.cuda.empty_cache()
        pools = graph_pool_bytes(device)
    for _ in range(warmup):
        result = step()
        if wait is not None:
            wait(result)
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        if before is not None:
            before()
        synchronize(device)
        if events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        result = step()
        if wait is not None:
            wait(result)
        if events:
            end.record()
        synchronize(device)
        times.append(start.elapsed_time(end) / 1e3 if events else time.perf_counter() - t0)
    if not cuda:
        return times, None, 0
    pools = max(0, graph_pool_bytes(device) - pools)
    return times, (torch.cuda.max_memory_allocated(device) + pools) / 2**30, pools


def graph_pool_bytes(device: torch.device | None) -> int:
    """Bytes that the private memory pools of CUDA graphs on ``device`` hold beyond their live
    tensors (0 off CUDA). A replayed graph's intermediate tensors live there: reserved when the
    graph was captured and free to the allocator, so never counted as allocated; a peak of
    allocated memory alone would leave them out (the live ones it counts already)."""
    if device is None or device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return sum(s["total_size"] - s["allocated_size"] for s in torch.cuda.memory._snapshot()["segments"]
               if s.get("device") == index and tuple(s.get("segment_pool_id", (0, 0))) != (0, 0))


def back_to_back_times(
    step: Callable[[], object],
    *,
    steps: int,
    rounds: int,
    device: torch.device | None = None,
    wait: Callable[[object], object] | None = None,
) -> list[float]:
    """
    Seconds per step of ``rounds`` rounds of ``steps`` calls each, synchronised once per round,
    not around each call: as a training loop that does not wait for each step's result runs,
    the host launching a step's work while the device still runs the previous step's. A step
    whose host work (Python, launches) takes less than its device work then costs about its
    device time; the per-step synchronised time of :func:`step_times` also counts the host's work
    while the device waits for it (at least the work before the step's first kernel). Run after
    :func:`step_times` (its warm-up).

    :param wait: called with the last result of each round until its work is done.
    :returns: one time per round: the round's seconds over ``steps``.
    """
    if rounds < 1 or steps < 1:
        raise ValueError(f"Expected at least one round of at least one step, got rounds={rounds}, steps={steps}.")
    times = []
    for _ in range(rounds):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            result = step()
        if wait is not None:
            wait(result)
        synchronize(device)
        times.append((time.perf_counter() - t0) / steps)
    return times


def timed(step: Callable[[], object], *, steps: int, warmup: int = 0, device: torch.device | None = None,
          back_to_back: int = 0, **kwargs) -> dict:
    """:func:`step_times` summarised: ``{"step_ms_median": ..., "peak_gib": ...}`` (the
    median in milliseconds; ``peak_gib`` only on CUDA, with ``graph_pool_gib``, the part of it
    that CUDA graphs' pools hold, where there are graphs). With ``back_to_back`` rounds, also
    ``"step_ms_back_to_back"``: the median over the rounds of :func:`back_to_back_times` (``steps``
    calls per round). ``kwargs`` go to :func:`step_times`."""
    if back_to_back < 0:
        raise ValueError(f"Expected back_to_back >= 0 rounds (0: none), got {back_to_back}.")
    times, peak, pools = _step_times(step, steps=steps, warmup=warmup, device=device, **kwargs)
    out = {"step_ms_median": 1e3 * statistics.median(times)}
    if peak is not None:
        out["peak_gib"] = peak
        if pools:
            out["graph_pool_gib"] = pools / 2**30
    if back_to_back:
        rounds = back_to_back_times(step, steps=steps, rounds=back_to_back, device=device, wait=kwargs.get("wait"))
        out["step_ms_back_to_back"] = 1e3 * statistics.median(rounds)
    return out


def collectives_per_step(record, steps: int) -> dict[str, dict[str, float]]:
    """
    What a :class:`~pyro_sp.distributed.record.CollectiveRecord` saw over ``steps`` steps, per
    step: the ``collectives``, ``bytes`` and ``seconds`` of every kind of
    :data:`COLLECTIVE_KINDS` (zero where none ran) and of any other kind recorded. Recording
    synchronises CUDA around each collective and loses the overlap, so time the recorded steps
    apart from the others.
    """
    kinds = list(COLLECTIVE_KINDS) + sorted({e[0] for e in record.events} - set(COLLECTIVE_KINDS))
    out = {}
    for kind in kinds:
        n, nbytes, seconds = record.total(kind)
        out[kind] = {"collectives": n / steps, "bytes": nbytes / steps, "seconds": seconds / steps}
    return out
