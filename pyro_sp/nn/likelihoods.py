# SPDX-License-Identifier: Apache-2.0
"""Likelihoods for network outputs with the particles on the left, inside a data plate."""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import predictive as _pyro_predictive
from pyro.poutine.runtime import get_plates

from pyro_sp.poutine import PARTICLE_PLATE

#: Plates whose dimension indexes samples of the network: the ELBO's particles
#: and the vectorized Predictive's samples.
_SAMPLE_PLATES = (
    PARTICLE_PLATE,
    getattr(_pyro_predictive, "_predictive_vectorize_plate_name", "_num_predictive_samples"),
)

__all__ = [
    "LIKELIHOODS",
    "LogLikelihood",
    "categorical_likelihood",
    "categorical_log_prob",
    "log_likelihood",
    "normal_likelihood",
    "normal_log_prob",
]

#: The likelihoods by name: the Pyro site of the model and the log-density the fused step sums.
LIKELIHOODS = ("categorical", "normal")

#: ``f(outputs, y) -> log p(y | outputs)`` of shape ``(particles, batch)``.
LogLikelihood = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def categorical_log_prob(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """
    :math:`\\log p(y_i \\mid \\text{logits}^{(k)}_i)` of :func:`categorical_likelihood`'s
    site, for logits ``(particles, batch, classes)``: shape ``(particles, batch)``.
    """
    if logits.dim() != 3:
        raise ValueError(f"Expected logits of shape (particles, batch, classes), got {tuple(logits.shape)}.")
    logp = logits.log_softmax(-1)
    return logp.gather(-1, y.expand(logits.shape[:2]).unsqueeze(-1)).squeeze(-1)


def normal_log_prob(means: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """
    :math:`\\log \\mathcal N(y_i; f^{(k)}(x_i), \\sigma^2)` of :func:`normal_likelihood`'s
    site with a fixed ``noise``, for means ``(particles, batch[, 1])``: shape ``(particles, batch)``.
    """
    if means.dim() == 3 and means.shape[-1] == 1:
        means = means.squeeze(-1)
    if means.dim() != 2:
        raise ValueError(f"Expected means of shape (particles, batch[, 1]), got {tuple(means.shape)}.")
    return -((y - means) ** 2) / (2 * sigma**2) - math.log(sigma) - _HALF_LOG_2PI


def log_likelihood(likelihood: str | LogLikelihood, noise_scale: float = 1.0) -> LogLikelihood:
    """
    The log-density ``f(outputs, y)`` of a likelihood given by name
    (:data:`LIKELIHOODS`; ``"normal"`` with the fixed ``noise_scale``), or
    ``likelihood`` itself if it is a callable.
    """
    if callable(likelihood):
        return likelihood
    if likelihood == "categorical":
        return categorical_log_prob
    if likelihood == "normal":
        if not noise_scale > 0:
            raise ValueError(f"Expected noise_scale > 0, got {noise_scale!r}.")
        sigma = float(noise_scale)

        def normal(out, y):
            return normal_log_prob(out, y, sigma)

        return normal
    raise ValueError(f"Expected likelihood in {LIKELIHOODS} or a callable, got {likelihood!r}.")


def _align(out: torch.Tensor, event_dims: int, batch_size: int, what: str) -> torch.Tensor:
    """
    Put the particle dimension of ``out`` (shape ``(P, B, *event)`` or
    ``(B, *event)``) where the particle plate is, so that the data plate
    (dim -1) lines up with ``B``. Refuses any other layout instead of letting
    it broadcast silently.
    """
    frames = [f for f in get_plates() if f.name in _SAMPLE_PLATES]
    body = out.dim() - event_dims
    if out.shape[body - 1] != batch_size:
        raise ValueError(
            f"Expected {what} with the batch ({batch_size}) as the last dimension before "
            f"{event_dims} event dimension(s), got shape {tuple(out.shape)}."
        )
    if not frames:
        if body == 2 and out.shape[0] == 1:
            return out.squeeze(0)
        if body != 1:
            raise ValueError(
                f"Expected {what} of shape (batch, ...) outside a particle plate, got {tuple(out.shape)}."
            )
        return out
    frame = frames[0]
    if body != 2 or out.shape[0] not in (1, frame.size):
        raise ValueError(
            f"Expected {what} of shape (particles={frame.size}, batch={batch_size}, ...), got "
            f"{tuple(out.shape)}: particles on the left, one batch dimension."
        )
    # particles at plate dim frame.dim (counted from the right of the batch dims)
    ones = [1] * (-frame.dim - 2)
    return out.reshape(out.shape[:1] + tuple(ones) + out.shape[1:])


def _plate(batch_size: int, num_data: int | None, name: str):
    if num_data is None:
        return pyro.plate(name, batch_size)
    if num_data < batch_size:
        raise ValueError(f"Expected num_data >= the batch size {batch_size}, got {num_data}.")
    # the rows were already chosen by the loader: only the scale num_data / batch matters
    return pyro.plate(name, num_data, subsample=torch.arange(batch_size))


def categorical_likelihood(
    logits: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    num_data: int | None = None,
    name: str = "y",
    plate_name: str = "data",
) -> torch.Tensor:
    """
    :math:`y_i \\sim \\mathrm{Categorical}(\\mathrm{softmax}(f(x_i)))` for a
    minibatch, scaled to a data set of ``num_data`` points. Also records the
    class probabilities as the deterministic site ``"probs"`` for
    :class:`~pyro_sp.DistributedPredictive`.

    :param logits: ``(particles, batch, classes)`` or ``(batch, classes)``.
    :param y: labels ``(batch,)``, or ``None`` to sample them.
    :param int num_data: size of the whole data set (default: the batch).
    :returns: the observed or sampled labels.
    """
    batch = logits.shape[-2]
    if y is not None and tuple(y.shape) != (batch,):
        raise ValueError(f"Expected labels of shape ({batch},), got {tuple(y.shape)}.")
    with _plate(batch, num_data, plate_name):
        logits = _align(logits, 1, batch, "logits")
        pyro.deterministic("probs", logits.softmax(-1), event_dim=1)
        return pyro.sample(name, dist.Categorical(logits=logits), obs=y)


def normal_likelihood(
    mean: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    noise: float | str = "learned",
    noise_prior_scale: float = 1.0,
    num_data: int | None = None,
    name: str = "y",
    plate_name: str = "data",
) -> torch.Tensor:
    """
    :math:`y_i \\sim \\mathcal N(f(x_i), \\sigma^2)` for a minibatch.

    :param mean: ``(particles, batch)`` or ``(particles, batch, 1)`` (or without
        the particle dimension).
    :param noise: a fixed :math:`\\sigma`, or ``"learned"``: a latent
        :math:`\\sigma \\sim \\mathrm{HalfNormal}(\\text{noise\\_prior\\_scale})`
        (site ``"sigma"``) for the guide to fit.
    :param int num_data: size of the whole data set (default: the batch).
    :returns: the observed or sampled targets.
    """
    if mean.dim() >= 2 and mean.shape[-1] == 1 and (y is None or y.dim() == 1):
        mean = mean.squeeze(-1)
    batch = mean.shape[-1]
    if y is not None and tuple(y.shape) != (batch,):
        raise ValueError(f"Expected targets of shape ({batch},), got {tuple(y.shape)}.")
    if noise == "learned":
        sigma = pyro.sample("sigma", dist.HalfNormal(mean.new_tensor(float(noise_prior_scale))))
    elif isinstance(noise, (int, float)) and noise > 0:
        sigma = mean.new_tensor(float(noise))
    else:
        raise ValueError(f"Expected noise to be a positive number or 'learned', got {noise!r}.")
    with _plate(batch, num_data, plate_name):
        mean = _align(mean, 0, batch, "means")
        pyro.deterministic("mean", mean)
        return pyro.sample(name, dist.Normal(mean, sigma), obs=y)
