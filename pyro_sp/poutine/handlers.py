# SPDX-License-Identifier: Apache-2.0
"""User-facing handlers of :mod:`pyro_sp.poutine`, in Pyro's handler style."""

from __future__ import annotations

import functools

from .shard_particles_messenger import ShardParticlesMessenger


def shard_particles(fn=None, *args, **kwargs):
    """
    Convenient wrapper of
    :class:`~pyro_sp.poutine.shard_particles_messenger.ShardParticlesMessenger`.

    Use it around an ELBO call (not around the model), as a context manager::

        with shard_particles(lo=0, hi=4, num_particles=8):
            loss = Trace_ELBO(num_particles=8, vectorize_particles=True).loss(model, guide)

    or wrapping a callable that runs the ELBO.
    """
    if fn is not None and not callable(fn):
        raise ValueError(f"{fn} is not callable, did you mean to pass it as a keyword arg?")
    msngr = ShardParticlesMessenger(*args, **kwargs)
    return functools.update_wrapper(msngr(fn), fn, updated=()) if fn is not None else msngr


shard_particles.__doc__ += "\n" + (ShardParticlesMessenger.__doc__ or "")
