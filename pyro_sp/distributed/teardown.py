# SPDX-License-Identifier: Apache-2.0
"""The clean exit of a distributed process: :func:`register_teardown`, called by
the first :class:`~pyro_sp.SPMesh` built over a process group."""

from __future__ import annotations

import atexit
import sys
import time

import torch.distributed as dist

from pyro_sp.distributed.failure import aborted, stop_watchdog

__all__ = ["register_teardown"]


_TEARDOWN_REGISTERED = [False]


def register_teardown() -> None:
    """Register :func:`_teardown` once per process (by any mesh built over a process group)."""
    if not _TEARDOWN_REGISTERED[0]:
        _TEARDOWN_REGISTERED[0] = True
        atexit.register(_teardown)


def _teardown() -> None:
    """
    End the distributed part of a process cleanly at interpreter exit, while
    the interpreter is still whole.

    Gloo's worker threads free each finished collective's tensors after the
    caller has seen the result; a tensor with a Python object needs the GIL
    to be freed. If that happens while the interpreter finalizes, the thread
    is stopped inside a C++ frame and the process aborts ("terminate called
    without an active exception", SIGABRT: a finished job that the launcher
    reports as failed; seen in core dumps as
    ``ProcessGroupGloo::runLoop → ~AsyncAllreduceWork → THPVariable_dealloc →
    take_gil → pthread_exit``). Here, at ``atexit``: the failure watchdog is
    stopped; the process groups are destroyed if the script did not do it
    (after a failure they are left alone, as destroying groups that peers
    still use can hang); and the worker threads get a moment, with the GIL
    released, to free what they still hold.
    """
    stop_watchdog()
    if aborted() or getattr(sys, "last_value", None) is not None:
        return
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    time.sleep(0.05)
