# SPDX-License-Identifier: Apache-2.0
"""Likelihoods for network outputs with the particles on the left, inside a data plate."""

from __future__ import annotations

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

__all__ = ["categorical_likelihood", "normal_likelihood"]


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
