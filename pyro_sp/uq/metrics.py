# SPDX-License-Identifier: Apache-2.0
"""Uncertainty metrics computed from posterior predictive samples.

Classification metrics take ``probs`` of shape ``(S, N, C)``: class
probabilities of ``S`` posterior samples for ``N`` inputs (the ``"probs"``
site of :func:`~pyro_sp.nn.categorical_likelihood`). Regression metrics take
samples of the predictive mean ``(S, N)`` and, where needed, of the noise
scale ``(S,)`` or ``(S, N)``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "accuracy",
    "aleatoric_uncertainty",
    "brier_score",
    "calibration_bins",
    "classification_report",
    "expected_calibration_error",
    "interval_coverage",
    "mutual_information",
    "negative_log_likelihood",
    "predictive_entropy",
    "regression_nll",
    "regression_report",
    "rmse",
]

_EPS = 1e-12


def _check_probs(probs: torch.Tensor) -> torch.Tensor:
    if probs.dim() != 3:
        raise ValueError(f"Expected probs of shape (samples, inputs, classes), got {tuple(probs.shape)}.")
    return probs.double()


def _mean_probs(probs: torch.Tensor) -> torch.Tensor:
    return _check_probs(probs).mean(0)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * (p + _EPS).log()).sum(-1)


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of inputs whose most probable class (under the predictive mean) is ``y``."""
    return (_mean_probs(probs).argmax(-1) == y).double().mean().item()


def negative_log_likelihood(probs: torch.Tensor, y: torch.Tensor) -> float:
    """:math:`-\\frac1N \\sum_i \\log \\bar p(y_i \\mid x_i)` with :math:`\\bar p` the predictive mean."""
    p = _mean_probs(probs)
    return -(p.gather(-1, y.long().unsqueeze(-1)).squeeze(-1) + _EPS).log().mean().item()


def brier_score(probs: torch.Tensor, y: torch.Tensor) -> float:
    """:math:`\\frac1N \\sum_i \\sum_c (\\bar p_{ic} - [y_i = c])^2`."""
    p = _mean_probs(probs)
    onehot = torch.nn.functional.one_hot(y.long(), p.shape[-1]).double()
    return ((p - onehot) ** 2).sum(-1).mean().item()


def calibration_bins(probs: torch.Tensor, y: torch.Tensor, num_bins: int = 15):
    """
    Equal-width confidence bins on ``[0, 1]``: per bin the count, the mean
    confidence (max predictive probability) and the accuracy. Empty bins have
    count 0 and NaN confidence and accuracy.
    """
    p = _mean_probs(probs)
    confidence, prediction = p.max(-1)
    correct = (prediction == y).double()
    index = (confidence * num_bins).long().clamp(max=num_bins - 1)
    counts = torch.bincount(index, minlength=num_bins).double()
    conf_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, confidence)
    acc_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, correct)
    with torch.no_grad():
        return counts, conf_sum / counts, acc_sum / counts


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, num_bins: int = 15) -> float:
    """:math:`\\sum_b \\frac{n_b}{N} |\\mathrm{acc}_b - \\mathrm{conf}_b|` over equal-width confidence bins."""
    counts, conf, acc = calibration_bins(probs, y, num_bins)
    full = counts > 0
    return ((counts[full] / counts.sum()) * (acc[full] - conf[full]).abs()).sum().item()


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Total uncertainty per input: :math:`H[\\bar p]`, shape ``(N,)``."""
    return _entropy(_mean_probs(probs))


def aleatoric_uncertainty(probs: torch.Tensor) -> torch.Tensor:
    """Expected entropy per input: :math:`\\frac1S \\sum_s H[p_s]`, shape ``(N,)``."""
    return _entropy(_check_probs(probs)).mean(0)


def mutual_information(probs: torch.Tensor) -> torch.Tensor:
    """Epistemic uncertainty per input: :math:`H[\\bar p] - \\frac1S \\sum_s H[p_s]`, shape ``(N,)``."""
    return predictive_entropy(probs) - aleatoric_uncertainty(probs)


def classification_report(probs: torch.Tensor, y: torch.Tensor, num_bins: int = 15) -> dict:
    """Accuracy, NLL, Brier score, ECE and the mean total / aleatoric / epistemic uncertainty."""
    return {
        "accuracy": accuracy(probs, y),
        "nll": negative_log_likelihood(probs, y),
        "brier": brier_score(probs, y),
        "ece": expected_calibration_error(probs, y, num_bins),
        "predictive_entropy": predictive_entropy(probs).mean().item(),
        "aleatoric": aleatoric_uncertainty(probs).mean().item(),
        "epistemic": mutual_information(probs).mean().item(),
    }


# ---- regression -------------------------------------------------------------------------
def _check_means(means: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if means.dim() != 2 or means.shape[1] != y.shape[0]:
        raise ValueError(
            f"Expected means of shape (samples, {y.shape[0]}), got {tuple(means.shape)}."
        )
    return means.double()


def rmse(means: torch.Tensor, y: torch.Tensor) -> float:
    """Root mean squared error of the predictive mean."""
    return ((_check_means(means, y).mean(0) - y.double()) ** 2).mean().sqrt().item()


def regression_nll(means: torch.Tensor, scales: torch.Tensor | float, y: torch.Tensor) -> float:
    """
    Negative log-likelihood of ``y`` under the predictive mixture
    :math:`\\frac1S \\sum_s \\mathcal N(y; \\mu_s, \\sigma_s^2)`, averaged over inputs.
    """
    means = _check_means(means, y)
    scales = torch.as_tensor(scales, dtype=torch.float64)
    if scales.dim() == 1:
        scales = scales.unsqueeze(-1)
    log_p = torch.distributions.Normal(means, scales).log_prob(y.double())
    return -(torch.logsumexp(log_p, 0) - math.log(means.shape[0])).mean().item()


def interval_coverage(samples: torch.Tensor, y: torch.Tensor, level: float = 0.9) -> float:
    """
    Fraction of targets inside the central ``level`` interval of their
    predictive samples (``samples`` of the observations, shape ``(S, N)``).
    """
    samples = _check_means(samples, y)
    lo, hi = torch.quantile(samples, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64), dim=0)
    y = y.double()
    return ((y >= lo) & (y <= hi)).double().mean().item()


def regression_report(means, scales, samples, y, level: float = 0.9) -> dict:
    """RMSE, NLL and the coverage of the central ``level`` interval."""
    return {
        "rmse": rmse(means, y),
        "nll": regression_nll(means, scales, y),
        f"coverage_{level:g}": interval_coverage(samples, y, level),
    }
