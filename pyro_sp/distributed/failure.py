# SPDX-License-Identifier: Apache-2.0
"""Stopping every rank when one rank fails where no collective can say so.

Most of pyro_sp's failure handling rides on a collective that every rank
makes anyway: the per-step check (:func:`pyro_sp.distributed.guard.step_check`)
carries a failure flag, and so does the gradient all-reduce of the
estimators. But some failures happen while the other ranks are already
inside a collective that the failing rank will never join, e.g. an
out-of-memory error in the middle of a backward pass whose gradient buckets
DDP is reducing. Left alone, those ranks wait for the collective timeout and
then raise a gloo or NCCL timeout that names neither the rank nor the error.

Here, the failing rank instead

1. posts ``(what, exception type, message)`` under ``pyro_sp/failure/<rank>``
   in the job's rendezvous store (the store of this launch attempt, so a
   restarted job never sees an old failure), and
2. aborts its process groups, which closes its connections: the collectives
   the other ranks wait in fail at once.

A rank whose collective fails calls :func:`explain`, which reads the posted
failures and turns the backend's "connection closed" into a
:class:`~pyro_sp.RankError` naming the failing rank and its exception. Under
NCCL a peer's abort does not wake a rank that waits on the GPU, so
:func:`start_watchdog` (started by :func:`pyro_sp.init_mesh` under NCCL)
polls the store once a second and aborts this rank's groups when a failure is
posted; gloo needs no watchdog.

After an abort the process groups are gone: the job cannot take another
step, and every later collective raises. Resume from a checkpoint.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import torch.distributed as dist

from pyro_sp.distributed.guard import RankError

__all__ = [
    "abort_everywhere",
    "abort_reason",
    "aborted",
    "check_not_aborted",
    "explain",
    "explained",
    "fail_fast",
    "failing_fast",
    "is_transport_error",
    "posted_failures",
    "start_watchdog",
    "stop_watchdog",
]

_PREFIX = "pyro_sp/failure/"
_COUNT = "pyro_sp/failures"
_WATCHDOG: threading.Thread | None = None
_ABORTED = threading.Event()
_STOP = threading.Event()
_REASON = [""]
#: Words of the messages of gloo's and NCCL's errors (raised as plain ``RuntimeError``).
_TRANSPORT_WORDS = ("gloo", "NCCL", "Connection closed", "Connection reset", "pair closure", "Timed out", "timed out")


def _store():
    """The default group's store (this launch attempt's), or ``None``."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no group, or a store-less init
        return None


def aborted() -> bool:
    """Whether this process aborted its process groups after a failure."""
    return _ABORTED.is_set()


def abort_reason() -> str:
    """The failure that made this process abort its groups (empty if it did not)."""
    return _REASON[0]


def fail_fast(error: BaseException, what: str) -> BaseException:
    """
    The exception to raise after ``error`` hit this rank while the other
    ranks may be waiting in a collective it will not join: the
    :class:`~pyro_sp.RankError` naming another rank whose failure came first
    (``error`` was then only the consequence, e.g. gloo's "connection
    closed"), or else ``error`` itself, after posting it and aborting this
    rank's process groups (:func:`abort_everywhere`).
    """
    better = explain(error, what)
    if better is not error:
        return better
    if is_transport_error(error):  # not this rank's failure: a peer vanished
        _abort_groups(f"a peer stopped answering in {what}")
        _note_peer_gone(error, what)
        return error
    abort_everywhere(error, what)
    return error


def is_transport_error(error: BaseException) -> bool:
    """Whether ``error`` comes from the communication backend (a closed connection, a timeout)."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(k in text for k in _TRANSPORT_WORDS)


def _note_peer_gone(error: BaseException, what: str) -> None:
    add_note = getattr(error, "add_note", None)  # Python >= 3.11: shown with the traceback
    if add_note is None:
        return
    rank = dist.get_rank() if dist.is_initialized() else "?"
    add_note(
        f"[pyro_sp] rank {rank}, in {what}: a peer stopped answering without reporting an error "
        "(a rank was killed, ran out of host memory, or its node went down). Its own log, or the "
        "launcher's, says why; restart the job (resume from the last checkpoint)."
    )


def check_not_aborted() -> None:
    """
    Raise if this process aborted its process groups after a failure: what
    would run next would otherwise see no process group and run, silently,
    as a single process.

    :raises RuntimeError: naming the failure that stopped the job.
    """
    if _ABORTED.is_set():
        raise RuntimeError(
            f"pyro_sp stopped this job's process groups after a failure ({_REASON[0] or 'see the error above'}); "
            "no rank can take another distributed step. Restart the job (resume from a checkpoint)."
        )


def abort_everywhere(error: BaseException, what: str) -> None:
    """
    Post this rank's failure and abort its process groups, so that every rank
    waiting for it in a collective stops at once. A no-op without a process
    group or if this rank has already aborted.

    :param error: the exception this rank hit.
    :param str what: the computation, e.g. ``"MeanFieldVI's step 12"``.
    """
    if not (dist.is_available() and dist.is_initialized()) or _ABORTED.is_set():
        return
    rank = dist.get_rank()
    store = _store()
    if store is not None:
        try:
            message = f"{what}\x00{type(error).__name__}\x00{error}"
            store.set(f"{_PREFIX}{rank}", message.encode())
            store.add(_COUNT, 1)
        except Exception:  # noqa: BLE001 - the abort below still stops the others
            pass
    _abort_groups(f"rank {rank} in {what}: {type(error).__name__}: {error}")


def _abort_groups(reason: str) -> None:
    if _ABORTED.is_set():
        return
    _REASON[0] = reason
    _ABORTED.set()
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception:  # noqa: BLE001 - fall back to aborting each backend
        for pg in list(getattr(dist.distributed_c10d._world, "pg_map", {})):
            try:
                pg.abort()
            except Exception:  # noqa: BLE001
                pass


def posted_failures(world: int | None = None) -> dict[int, tuple[str, str, str]]:
    """``{rank: (what, exception type, message)}`` of the failures posted in this launch attempt."""
    store = _store()
    if store is None:
        return {}
    try:
        if not store.check([_COUNT]) or int(store.add(_COUNT, 0)) == 0:
            return {}
        if world is None:
            world = dist.get_world_size() if dist.is_initialized() else 0
        out = {}
        for rank in range(world):
            key = f"{_PREFIX}{rank}"
            if store.check([key]):
                what, kind, message = store.get(key).decode().split("\x00", 2)
                out[rank] = (what, kind, message)
        return out
    except Exception:  # noqa: BLE001 - the store itself is gone: nothing to add
        return {}


def explain(error: BaseException, what: str, world: int | None = None) -> BaseException:
    """
    The exception to raise on a rank whose collective failed with ``error``:
    a :class:`~pyro_sp.RankError` naming the ranks that posted a failure
    (with ``error`` as its cause), or ``error`` itself when none did (a rank
    that died, a network fault).
    """
    if world is None:
        world = dist.get_world_size() if dist.is_initialized() else 0
    posted = {}
    for _ in range(20):  # the failing rank posts before it aborts; allow for a slow store
        posted = posted_failures(world)
        if posted:
            break
        time.sleep(0.05)
    if not posted:
        return error
    _abort_groups("; ".join(f"rank {r} in {w}: {k}: {m}" for r, (w, k, m) in sorted(posted.items())))
    hint = (
        "The process groups were aborted to stop every rank at once; this job cannot take another "
        "step. Restart it (resume from a checkpoint)."
    )
    where = sorted({w for w, _, _ in posted.values()})
    out = RankError(" / ".join(where) if where else what, {r: (k, m) for r, (_, k, m) in posted.items()},
                    world or len(posted), hint)
    out.__cause__ = error
    return out


def _explain_transport(error: BaseException, what: str) -> BaseException:
    """:func:`explain` for a backend error, with a note when no rank posted one; other errors as they are."""
    if not is_transport_error(error):
        return error
    better = explain(error, what)
    if better is error:
        _note_peer_gone(error, what)
    return better


@contextlib.contextmanager
def _raising(what: str, convert) -> Iterator[None]:
    """Raise an exception of the block as ``convert(error, what)`` (chained), or as itself."""
    try:
        yield
    except RankError:
        raise
    except Exception as e:
        if not (dist.is_available() and dist.is_initialized()):
            raise
        better = convert(e, what)
        if better is e:
            raise
        raise better from e


def explained(what: str):
    """
    Turn a collective's failure inside the block (a ``RuntimeError`` from
    gloo or NCCL after a peer aborted) into the :class:`~pyro_sp.RankError`
    that names the rank that failed first (see :func:`explain`). Other
    exceptions pass through; costs nothing when nothing fails.
    """
    return _raising(what, _explain_transport)


def failing_fast(what: str):
    """
    For a block after which (or inside which) the other ranks wait in a
    collective: an exception inside it is raised through :func:`fail_fast`,
    so the others stop at once instead of waiting for the timeout. Costs
    nothing when nothing fails; a no-op without a process group.
    """
    return _raising(what, fail_fast)


def start_watchdog(interval: float = 1.0) -> bool:
    """
    Start (once per process) a daemon thread that aborts this rank's process
    groups as soon as another rank posts a failure. Needed under NCCL, where
    a rank waiting on the GPU for a peer that aborted would otherwise wait
    for the timeout. Costs one store query per ``interval`` seconds.

    :returns: whether a watchdog is running.
    """
    global _WATCHDOG
    if _WATCHDOG is not None and _WATCHDOG.is_alive():
        return True
    store = _store()
    if store is None:
        return False

    def watch() -> None:
        while not _STOP.wait(interval) and not _ABORTED.is_set():
            try:
                if store.check([_COUNT]):
                    _abort_groups("another rank posted a failure")
                    return
            except Exception:  # noqa: BLE001 - the store went away: the job is ending
                return

    _STOP.clear()
    _WATCHDOG = threading.Thread(target=watch, name="pyro_sp failure watchdog", daemon=True)
    _WATCHDOG.start()
    return True


def stop_watchdog() -> None:
    """Stop the watchdog thread (before the process groups are destroyed)."""
    global _WATCHDOG
    _STOP.set()
    if _WATCHDOG is not None:
        _WATCHDOG.join(timeout=5)
        _WATCHDOG = None
