# SPDX-License-Identifier: Apache-2.0
"""Uncertainty metrics and plots from posterior predictive samples."""

from .metrics import (
    accuracy,
    aleatoric_uncertainty,
    brier_score,
    calibration_bins,
    classification_report,
    expected_calibration_error,
    interval_coverage,
    mutual_information,
    negative_log_likelihood,
    predictive_entropy,
    regression_nll,
    regression_report,
    rmse,
)
from .plots import reliability_diagram, uncertainty_vs_error

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
    "reliability_diagram",
    "rmse",
    "uncertainty_vs_error",
]
