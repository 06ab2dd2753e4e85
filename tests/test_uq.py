# SPDX-License-Identifier: Apache-2.0
"""Uncertainty metrics against values computed by hand, and the plots."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_sp import uq


def H(*p):
    return -sum(q * math.log(q) for q in p)


PROBS = torch.tensor([[[0.9, 0.1], [0.4, 0.6]], [[0.7, 0.3], [0.2, 0.8]]])  # (S=2, N=2, C=2)
Y = torch.tensor([0, 0])  # predictive mean [[0.8, 0.2], [0.3, 0.7]]


def test_classification_by_hand():
    assert uq.accuracy(PROBS, Y) == 0.5
    assert uq.negative_log_likelihood(PROBS, Y) == pytest.approx(-(math.log(0.8) + math.log(0.3)) / 2)
    assert uq.brier_score(PROBS, Y) == pytest.approx(((0.2**2 + 0.2**2) + (0.7**2 + 0.7**2)) / 2)
    # confidences 0.8 (correct) and 0.7 (wrong) fall in bins 3 and 2 of 4
    assert uq.expected_calibration_error(PROBS, Y, num_bins=4) == pytest.approx(0.5 * 0.2 + 0.5 * 0.7)
    # in one bin (of 1): |accuracy 0.5 - mean confidence 0.75|
    assert uq.expected_calibration_error(PROBS, Y, num_bins=1) == pytest.approx(0.25)
    total = [H(0.8, 0.2), H(0.3, 0.7)]
    aleatoric = [(H(0.9, 0.1) + H(0.7, 0.3)) / 2, (H(0.4, 0.6) + H(0.2, 0.8)) / 2]
    torch.testing.assert_close(uq.predictive_entropy(PROBS), torch.tensor(total, dtype=torch.float64))
    torch.testing.assert_close(uq.aleatoric_uncertainty(PROBS), torch.tensor(aleatoric, dtype=torch.float64))
    torch.testing.assert_close(
        uq.mutual_information(PROBS), torch.tensor([t - a for t, a in zip(total, aleatoric)], dtype=torch.float64)
    )
    report = uq.classification_report(PROBS, Y, num_bins=10)
    assert report["accuracy"] == 0.5 and report["epistemic"] == pytest.approx(
        sum(t - a for t, a in zip(total, aleatoric)) / 2
    )
    with pytest.raises(ValueError, match="samples, inputs, classes"):
        uq.accuracy(PROBS[0], Y)


def test_perfect_calibration_has_zero_ece():
    probs = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert uq.expected_calibration_error(probs, torch.tensor([0, 1])) == 0.0


def test_regression_by_hand():
    means = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    y = torch.tensor([2.0, 1.0])
    assert uq.rmse(means, y) == pytest.approx(math.sqrt(0.5))
    # every component is one standard deviation away from its target
    assert uq.regression_nll(means, 1.0, y) == pytest.approx(0.5 + 0.5 * math.log(2 * math.pi))
    assert uq.regression_nll(means, torch.tensor([1.0, 1.0]), y) == pytest.approx(0.5 + 0.5 * math.log(2 * math.pi))
    samples = torch.arange(1.0, 12.0).unsqueeze(-1).expand(11, 2)  # 1..11 for both inputs
    # central 80% interval of 1..11 is [2, 10]: 5 is inside, 11 outside
    assert uq.interval_coverage(samples, torch.tensor([5.0, 11.0]), level=0.8) == 0.5
    report = uq.regression_report(means, 1.0, samples[:, :2][:2], y, level=0.8)
    assert set(report) == {"rmse", "nll", "coverage_0.8"}
    with pytest.raises(ValueError, match="means of shape"):
        uq.rmse(means[0], y)


def test_plots_are_written(tmp_path):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(8, 200, 4, generator=g) * 2, -1)
    y = torch.randint(0, 4, (200,), generator=g)
    for fn, name in ((uq.reliability_diagram, "reliability.png"), (uq.uncertainty_vs_error, "uncertainty.png")):
        path = fn(probs, y, str(tmp_path / name))
        with open(path, "rb") as f:
            data = f.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
