# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

from pyro.infer import JitTrace_ELBO, Trace_ELBO
from pyro.util import warn_if_nan

from .distributed_elbo import DistributedELBO

__all__ = ["DistributedJitTrace_ELBO", "DistributedTrace_ELBO"]


class DistributedTrace_ELBO(DistributedELBO, Trace_ELBO):
    """
    :class:`~pyro.infer.Trace_ELBO` with its vectorized particles split over
    the sample axis of a :class:`~pyro_sp.SPMesh`; loss and gradients equal
    the single-process ``Trace_ELBO(num_particles=N, vectorize_particles=True)``
    (averaged over data groups when the mesh has a data axis).

    Example::

        mesh = pyro_sp.init_mesh(sample=2)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}),
                  loss=pyro_sp.DistributedTrace_ELBO(num_particles=64, mesh=mesh))

    See :class:`~pyro_sp.infer.distributed_elbo.DistributedELBO` for the
    estimator, the arguments and the synchronisation.
    """

    _compilable = True


class DistributedJitTrace_ELBO(DistributedELBO, JitTrace_ELBO):
    """
    :class:`~pyro.infer.JitTrace_ELBO`, sharded like :class:`DistributedTrace_ELBO`.
    Each rank compiles its own share. Randomly subsampled data plates are
    refused under a sample axis (the compiled graph would draw different
    indices on each rank): pass ``subsample=`` indices instead.

    .. note:: ``differentiable_loss`` returns ``loss.detach() + (surrogate -
        surrogate.detach())``. Pyro 1.9's ``JitTrace_ELBO.differentiable_loss``
        leaves ``loss`` attached, so its gradient counts the reparameterized
        part twice (twice the gradient of ``loss_and_grads``); pyro_sp's
        gradient is that of ``loss_and_grads``, in one process too.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return self._sharded(
            "differentiable_loss", self._local_differentiable_loss, model, guide, args, kwargs
        )

    def _local_differentiable_loss(self, model, guide, *args, **kwargs):
        loss, surrogate_loss = self.loss_and_surrogate_loss(model, guide, *args, **kwargs)
        loss = loss.detach()
        warn_if_nan(loss, "loss")
        return loss + (surrogate_loss - surrogate_loss.detach())
