# SPDX-License-Identifier: Apache-2.0
"""A training loop for sampling-parallel SVI: sharded minibatches, progress
bar and metrics log on rank 0, NaN detection, checkpoint and resume."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable

import torch
from pyro import poutine
from tqdm import tqdm

from pyro_sp.checkpoint import load_checkpoint, save_checkpoint
from pyro_sp.data.sampler import ShardedBatchSampler
from pyro_sp.distributed.failure import aborted
from pyro_sp.distributed.mesh import SPMesh

__all__ = ["MetricsLog", "fit"]


class MetricsLog:
    """JSON lines of metrics, written by rank 0 only (appends, so a resumed run continues its log)."""

    def __init__(self, path: str | None, *, mesh: SPMesh) -> None:
        self.path = path if mesh.rank == 0 else None
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._tb = None

    def write(self, **record) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def tensorboard(self, logdir: str) -> None:
        """Also send scalars to TensorBoard, if it is installed."""
        if self.path is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional
            return
        self._tb = SummaryWriter(logdir)

    def scalar(self, name: str, value: float, step: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(name, value, step)


def fit(
    step,
    sampler: ShardedBatchSampler,
    batch: Callable[[torch.Tensor], tuple],
    *,
    epochs: int,
    mesh: SPMesh,
    elbo=None,
    objects: dict | None = None,
    checkpoint: str | None = None,
    checkpoint_every: int = 0,
    rank_objects: dict | None = None,
    log: MetricsLog | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """
    Run ``epochs`` epochs of ``step(*batch(indices))`` over ``sampler``, for
    either training path:

    - an :class:`~pyro.infer.SVI` (its ``svi.step``; its optimizer and
      estimator are checkpointed, and the model and guide primed on resume);
    - any callable ``step(*args)`` returning the step's global loss (a float
      or a 0-d tensor), e.g. ``lambda x, y: vi.step(optimizer, x, y)`` for a
      :class:`~pyro_sp.nn.MeanFieldVI`, with ``objects={"vi": vi,
      "optimizer": optimizer}`` to checkpoint what it trains.

    With ``checkpoint`` set, a checkpoint is written every ``checkpoint_every``
    steps and at the end, and a run that finds the file resumes from it
    (parameters, every object's ``state_dict``, step, epoch, position in the
    epoch, every rank's random streams), continuing exactly where it stopped.

    On resume, what Pyro sets up lazily on a first call and draws from the
    global RNG for (an autoguide's prototype, the estimator's
    ``max_plate_nesting`` guess) is set up on the first batch outside the
    restored random state (:func:`prime`): the uninterrupted run did it
    before the checkpoint, not after.

    A non-finite loss stops every rank (the loss is the same on all of them)
    with :class:`FloatingPointError` naming the step.

    A step that returns its loss as a CUDA tensor (e.g. :meth:`MeanFieldVI.step
    <pyro_sp.nn.MeanFieldVI.step>`) is read one step late: the loss is copied to pinned host
    memory behind the step, and the host reads it after queuing the next step, so that the
    device does not wait for the host (logging, the progress bar, the next batch) between
    steps. A non-finite loss at step :math:`t` is then raised after step :math:`t + 1` has run,
    on every rank, naming step :math:`t`. A step that writes a checkpoint or calls ``on_step``
    reads its own loss first, so those see a checked step and nothing queued after it. A loss
    returned as a float or a CPU tensor (an ``SVI``) is read at once. The gain needs a ``batch``
    that does not wait for the device either: indexing a CUDA tensor with the sampler's CPU
    indices, or ``.to(device)`` without ``non_blocking=True``, copies them with a synchronisation;
    move the indices first with ``idx.pin_memory().to(device, non_blocking=True)``. Every loss is
    read as its step returns when any rank passes ``on_step``, and a step that synchronises
    itself (``MeanFieldVI(check="always")``, a reduction that reads values on the host) gains
    nothing.

    :param step: an ``SVI``, or a callable taking a batch and returning its loss.
    :param dict objects: objects equal on every rank to checkpoint, by name
        (``state_dict`` / ``load_state_dict``; see :func:`~pyro_sp.save_checkpoint`).
    :returns: ``{"step", "loss", "seconds", "resumed_from"}``.
    """
    log = log or MetricsLog(None, mesh=mesh)
    svi = step if _is_svi(step) else None
    optim = None
    if svi is not None:
        optim, step = svi.optim, svi.step
        if elbo is None:  # SVI keeps the estimator's bound loss_and_grads
            candidate = getattr(getattr(svi, "loss_and_grads", None), "__self__", None)
            elbo = candidate if hasattr(candidate, "load_state_dict") else None
    elif not callable(step):
        raise TypeError(f"Expected an SVI or a callable step(*batch) -> loss, got {type(step).__name__}.")
    state = {"optim": optim, "elbo": elbo, "objects": objects, "rank_objects": rank_objects}
    done, resumed_from = 0, None
    # rank 0 decides whether to resume, so that no rank resumes alone; every loss is read as its step
    # returns if any rank has on_step, so that all ranks stop at the same step
    resume, at_once = _agree(bool(checkpoint) and os.path.exists(checkpoint), on_step is not None, mesh)
    if resume:
        done = resumed_from = load_checkpoint(checkpoint, mesh=mesh, **state)["step"]
    per_epoch = len(sampler)
    total = epochs * per_epoch
    bar = tqdm(total=total, initial=done, disable=not progress or mesh.rank != 0, desc="SVI" if svi else "train",
               unit="step")
    loss, start, count = float("nan"), time.perf_counter(), done
    primed = svi is None or not resume
    pending = None  # (step, epoch, LossReading) of the last step whose loss is not read yet

    def settle() -> None:
        nonlocal loss, pending
        n, ep, reading = pending
        pending = None
        loss = reading.value()
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"The loss is {loss} at step {n} (epoch {ep}); every rank stops here. "
                "Lower the learning rate or check the model."
            )
        elapsed = time.perf_counter() - start
        rate = (n - done) / elapsed if elapsed > 0 else 0.0
        log.write(step=n, epoch=ep, loss=loss, steps_per_second=rate)
        log.scalar("loss", loss, n)
        bar.set_postfix(loss=f"{loss:.4g}", steps_s=f"{rate:.1f}")
        bar.update(1)

    while count < total:
        epoch, offset = divmod(count, per_epoch)
        sampler.set_epoch(epoch)
        for i, idx in enumerate(sampler):
            if i < offset:
                continue
            try:
                args = batch(idx)
                if not primed:
                    prime(svi.model, svi.guide, args, elbo=elbo)
                    primed = True
                reading = _LossReading(step(*args))
            except BaseException:
                if pending is None or aborted():  # an abort may have cut the step before short: not read
                    raise
                settle()  # a non-finite loss before this step is the cause to report (every rank has it)
                raise
            count += 1
            if pending is not None:  # the step before: read while the device runs this one
                settle()
            pending = (count, epoch, reading)
            due = bool(checkpoint and checkpoint_every and count % checkpoint_every == 0)
            if reading.ready or due or at_once:
                settle()  # a checkpoint or on_step sees this step's state, its loss checked first
            if due:
                save_checkpoint(checkpoint, mesh=mesh, step=count, epoch=epoch, **state)
            if on_step is not None:  # after the checkpoint of this step
                on_step(count)
    if pending is not None:
        settle()
    bar.close()
    if checkpoint:
        save_checkpoint(checkpoint, mesh=mesh, step=count, epoch=epochs, **state)
    return {"step": count, "loss": loss, "seconds": time.perf_counter() - start, "resumed_from": resumed_from}


class _LossReading:
    """
    One step's loss, read from the device without waiting for the steps queued after it.

    A CUDA tensor is copied into pinned host memory behind the step that made it
    (``non_blocking``), and a CUDA event marks the copy's end: :meth:`value` waits on that event
    only, whereas ``float()`` of a CUDA tensor waits for everything queued on its stream, the
    next step included. Anything else (a float, a CPU tensor) is read at once (``ready``).
    """

    def __init__(self, loss) -> None:
        self._event = None
        if isinstance(loss, torch.Tensor) and loss.numel() != 1:
            raise ValueError(f"Expected the step to return its loss as a float or a one-element tensor, "
                             f"got a tensor of shape {tuple(loss.shape)}. Return the total loss (e.g. .sum()).")
        if isinstance(loss, torch.Tensor) and loss.is_cuda:
            # the loss kept until read: its memory is not reused (on another stream) before the copy ran
            self._loss = loss.detach()
            self._host = torch.empty(loss.shape, dtype=loss.dtype, pin_memory=True)
            self._host.copy_(self._loss, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(loss.device))
        else:
            self._value = float(loss)

    @property
    def ready(self) -> bool:
        """The value is on the host already (nothing to wait for)."""
        return self._event is None

    def value(self) -> float:
        if self._event is not None:
            self._event.synchronize()
            self._value, self._event, self._loss = float(self._host), None, None
        return self._value


def _agree(resume: bool, on_step: bool, mesh: SPMesh) -> tuple[bool, bool]:
    """Rank 0's ``resume`` and ``on_step`` or-ed over the ranks, on every rank (one collective when
    distributed)."""
    if not mesh.is_distributed:
        return resume, on_step
    flags = [None] * mesh.world_size
    torch.distributed.all_gather_object(flags, (resume, on_step))
    return flags[0][0], any(f[1] for f in flags)


def _is_svi(step) -> bool:
    """An SVI-like object: ``step``, ``optim``, ``model`` and ``guide`` (Pyro's SVI, or a subclass)."""
    return all(hasattr(step, a) for a in ("step", "optim", "model", "guide"))


def prime(model: Callable, guide: Callable, args: tuple, kwargs: dict | None = None, *, elbo=None) -> None:
    """
    Set up what Pyro builds lazily on a first call, without moving the
    global random state: the estimator's ``max_plate_nesting`` guess (Pyro
    runs the model and guide for it when it was not given) and a lazily built
    guide (an autoguide runs the model to build its prototype). Both draw
    from the global RNG; here they run blocked, without gradients and on a
    forked RNG. Used after a checkpoint's random state is restored, so the
    resumed run draws exactly what the uninterrupted one did.
    """
    kwargs = kwargs or {}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        if elbo is not None and getattr(elbo, "max_plate_nesting", None) == float("inf"):
            elbo._guess_max_plate_nesting(model, guide, args, kwargs)  # Pyro's own guess, blocked
        with poutine.block():
            guide(*args, **kwargs)
