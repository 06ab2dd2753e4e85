# SPDX-License-Identifier: Apache-2.0
"""Pyro's ``Forecaster`` trained with a sampling-parallel estimator."""

from __future__ import annotations

import logging

from pyro import poutine
from pyro.contrib.forecast.forecaster import (
    Forecaster,
    MarkDCTParamMessenger,
    PrefixWarmStartMessenger,
    time_reparam_dct,
    time_reparam_haar,
)
from pyro.infer import SVI
from pyro.infer.autoguide import init_to_sample
from pyro.optim import DCTAdam

from pyro_sp.infer import DistributedTrace_ELBO
from pyro_sp.distributed.mesh import SPMesh

__all__ = ["DistributedForecaster"]

logger = logging.getLogger(__name__)


class DistributedForecaster(Forecaster):
    """
    :class:`pyro.contrib.forecast.Forecaster`, trained with
    :class:`~pyro_sp.DistributedTrace_ELBO` (or ``elbo_class``): Pyro's
    ``Forecaster`` builds its ``Trace_ELBO`` inside its constructor and takes
    no ``loss=``, so this subclass is the supported way to split its
    particles over the sample axis. Swap the class name; every argument and
    default is Pyro's, forecasting (``forecaster(data, covariates,
    num_samples)``) is Pyro's, unchanged.

    It lets Pyro's constructor build the model wrapper, the guide and the
    ``max_plate_nesting`` guess with ``num_steps=0``, then runs Pyro's training
    loop (the same optimizer, learning-rate decay, clipping, DCT gradients,
    warm start and time reparameterization) with the distributed estimator.
    In one process it is bit-identical to ``Forecaster`` (tested).

    :param SPMesh mesh: the process grid; default :func:`~pyro_sp.default_mesh`.
    :param elbo_class: a pyro_sp estimator class taking ``num_particles``,
        ``vectorize_particles``, ``max_plate_nesting`` and ``mesh``.
    """

    def __init__(
        self,
        model,
        data,
        covariates,
        *,
        guide=None,
        init_loc_fn=init_to_sample,
        init_scale=0.1,
        create_plates=None,
        optim=None,
        learning_rate=0.01,
        betas=(0.9, 0.99),
        learning_rate_decay=0.1,
        clip_norm=10.0,
        time_reparam=None,
        dct_gradients=False,
        subsample_aware=False,
        num_steps=1001,
        num_particles=1,
        vectorize_particles=True,
        warm_start=False,
        log_every=100,
        mesh: SPMesh | None = None,
        elbo_class=DistributedTrace_ELBO,
    ):
        super().__init__(
            model,
            data,
            covariates,
            guide=guide,
            init_loc_fn=init_loc_fn,
            init_scale=init_scale,
            create_plates=create_plates,
            time_reparam=time_reparam,
            num_steps=0,  # Pyro builds everything but trains nothing; we train below
            num_particles=num_particles,
            vectorize_particles=vectorize_particles,
        )
        train_model, train_guide = model, self.guide
        if time_reparam == "haar":
            train_model = poutine.reparam(train_model, time_reparam_haar)
        elif time_reparam == "dct":
            train_model = poutine.reparam(train_model, time_reparam_dct)
        if warm_start:
            train_model = PrefixWarmStartMessenger()(train_model)
            train_guide = PrefixWarmStartMessenger()(train_guide)
        if dct_gradients:
            train_model = MarkDCTParamMessenger("time")(train_model)
            train_guide = MarkDCTParamMessenger("time")(train_guide)
        elbo = elbo_class(
            num_particles=num_particles,
            vectorize_particles=vectorize_particles,
            max_plate_nesting=self.max_plate_nesting,
            mesh=mesh,
        )
        self.elbo = elbo
        losses = []
        if num_steps:
            if optim is None:
                optim = DCTAdam(
                    {
                        "lr": learning_rate,
                        "betas": betas,
                        "lrd": learning_rate_decay ** (1 / num_steps),
                        "clip_norm": clip_norm,
                        "subsample_aware": subsample_aware,
                    }
                )
            self.guide.create_plates = create_plates  # Pyro's constructor disabled it after (no) training
            svi = SVI(train_model, train_guide, optim, elbo)
            for step in range(num_steps):
                loss = svi.step(data, covariates) / data.numel()
                if log_every and step % log_every == 0:
                    logger.info("step %4d loss = %0.6g", step, loss)
                losses.append(loss)
            self.guide.create_plates = None  # no subsampling when forecasting, as in Pyro
        self.losses = losses
