# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

if TYPE_CHECKING:
    from pyro.poutine.runtime import Message

    from pyro_sp.distributed.streams import RNGStream

#: Name of the particle plate that :class:`pyro.infer.ELBO` builds.
PARTICLE_PLATE = "num_particles_vectorized"


class ShardParticlesMessenger(Messenger):
    """
    Restricts the vectorized particle plate of an ELBO to this rank's share
    ``[lo, hi)`` of the global ``num_particles``.

    The particle plate is a :class:`pyro.plate` named ``"num_particles_vectorized"``
    that :meth:`pyro.infer.ELBO._vectorized_num_particles` builds when the ELBO
    runs, so this messenger must be active around the ELBO call
    (``loss``, ``loss_and_grads``, ``svi.step``), not around the model. It
    answers the plate's subsample site with ``arange(lo, hi)``, and then takes
    back the factor :math:`N / n` that a subsampled plate puts on every site in
    it, so that a site's log-density is the plain sum over the local particles:

    .. math:: \\sum_{k=lo}^{hi-1} \\log p(x, z_k) - \\log q(z_k).

    Divided by the global :math:`N` (as every linear ELBO does), the shares of
    all ranks add up to the single-process estimator exactly.

    A rank with no particles (``lo == hi``, when ``num_particles`` is smaller
    than the sample axis) evaluates one stand-in particle, so that it creates
    the same parameters and runs the same collectives as the others; the
    distributed ELBO discards that rank's loss and gradients.

    Optionally it also draws the indices of every *other* randomly subsampled
    plate from ``subsample_rng``, a stream that all ranks of a sample group
    share, so that they see the same data subsample while their particle noise
    differs.

    :param int lo: first particle of this rank.
    :param int hi: one past the last particle of this rank.
    :param int num_particles: the global number of particles :math:`N`; the
        particle plate must have this size.
    :param subsample_rng: optional :class:`~pyro_sp.distributed.streams.RNGStream` for the
        indices of data-plate subsampling.
    :param bool shared_subsample: whether those indices must agree across
        the sample group (default: whether ``subsample_rng`` is given); a
        JIT-compiled ELBO cannot share them and is refused.
    :param str name: name of the particle plate.
    """

    def __init__(
        self,
        lo: int,
        hi: int,
        num_particles: int,
        *,
        subsample_rng: RNGStream | None = None,
        shared_subsample: bool | None = None,
        name: str = PARTICLE_PLATE,
    ) -> None:
        if not 0 <= lo <= hi <= num_particles or num_particles < 1:
            raise ValueError(
                f"Expected 0 <= lo <= hi <= num_particles, got lo={lo}, hi={hi}, "
                f"num_particles={num_particles}."
            )
        super().__init__()
        self.empty = lo == hi
        if self.empty:  # one stand-in particle
            lo = min(lo, num_particles - 1)
            hi = lo + 1
        self.lo, self.hi, self.num_particles = lo, hi, num_particles
        self.subsample_rng = subsample_rng
        self.shared_subsample = subsample_rng is not None if shared_subsample is None else shared_subsample
        self.name = name
        self._unscale = (hi - lo) / num_particles

    def _pyro_sample(self, msg: Message) -> None:
        fn = msg["fn"]
        if not isinstance(fn, _Subsample) or msg["value"] is not None:
            return
        if msg["name"] == self.name:
            if fn.size != self.num_particles:
                raise ValueError(
                    f"Expected the particle plate {self.name!r} to have size "
                    f"{self.num_particles} (the global num_particles), got {fn.size}. "
                    "Give the distributed ELBO the same num_particles on every rank."
                )
            msg["value"] = torch.arange(self.lo, self.hi, device=fn.device)
        elif (
            self.shared_subsample
            and fn.subsample_size is not None
            and fn.subsample_size < fn.size
        ):
            if torch.jit.is_tracing():
                raise ValueError(
                    f"Random subsampling of plate {msg['name']!r} cannot be shared across "
                    "the sample axis inside a JIT-compiled ELBO: the compiled graph would "
                    "draw different indices on each rank. Pass subsample= indices to the "
                    "plate, or use the non-JIT estimator."
                )
            if self.subsample_rng is not None:
                with self.subsample_rng:
                    msg["value"] = fn.sample()

    def _process_message(self, msg: Message) -> None:
        super()._process_message(msg)
        if self._unscale != 1.0 and any(
            frame.name == self.name for frame in msg["cond_indep_stack"]
        ):
            msg["scale"] = msg["scale"] * self._unscale
