# SPDX-License-Identifier: Apache-2.0
"""Uncertainty metrics against values computed by hand, and the plots."""

from __future__ import annotations

import math
import re

import matplotlib
import matplotlib.image
import numpy as np
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
    report = uq.classification_report(PROBS, Y, num_bins=8)
    # eight bins: confidences 0.8 and 0.7 fall in bins 6 and 5, each on its own (away from the edges)
    assert report == {
        "accuracy": 0.5,
        "nll": pytest.approx(-(math.log(0.8) + math.log(0.3)) / 2),
        "brier": pytest.approx(((0.2**2 + 0.2**2) + (0.7**2 + 0.7**2)) / 2),
        "ece": pytest.approx(0.5 * 0.2 + 0.5 * 0.7),
        "predictive_entropy": pytest.approx(sum(total) / 2),
        "aleatoric": pytest.approx(sum(aleatoric) / 2),
        "epistemic": pytest.approx(sum(t - a for t, a in zip(total, aleatoric)) / 2),
    }
    with pytest.raises(ValueError, match=re.escape("Expected probs of shape (samples, inputs, classes), got (2, 2).")):
        uq.accuracy(PROBS[0], Y)


def test_classification_against_sklearn_and_numpy():
    """Random predictions: the metrics against scikit-learn and a plain numpy binning."""
    import numpy as np
    from sklearn.metrics import accuracy_score, log_loss

    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(2 * torch.randn(5, 300, 4, generator=g, dtype=torch.float64), -1)
    y = torch.randint(0, 4, (300,), generator=g)
    mean, labels = probs.mean(0).numpy(), y.numpy()
    assert uq.accuracy(probs, y) == pytest.approx(accuracy_score(labels, mean.argmax(-1)), abs=1e-15)
    assert uq.negative_log_likelihood(probs, y) == pytest.approx(log_loss(labels, mean, labels=range(4)), rel=1e-9)
    assert uq.brier_score(probs, y) == pytest.approx(((mean - np.eye(4)[labels]) ** 2).sum(-1).mean(), rel=1e-12)
    confidence, correct = mean.max(-1), mean.argmax(-1) == labels
    bins = np.minimum((confidence * 10).astype(int), 9)
    ece = sum(
        (bins == b).mean() * abs(correct[bins == b].mean() - confidence[bins == b].mean())
        for b in range(10)
        if (bins == b).any()
    )
    assert uq.expected_calibration_error(probs, y, num_bins=10) == pytest.approx(ece, rel=1e-12)


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
    # against targets [2, 1]: 2 is inside [2, 10], 1 outside
    report = uq.regression_report(means, 1.0, samples, y, level=0.8)
    assert report == {
        "rmse": pytest.approx(math.sqrt(0.5)),
        "nll": pytest.approx(0.5 + 0.5 * math.log(2 * math.pi)),
        "coverage_0.8": 0.5,
    }
    with pytest.raises(ValueError, match=re.escape("Expected means of shape (samples, 2), got (2,).")):
        uq.rmse(means[0], y)


def test_plots_are_written(tmp_path):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(8, 200, 4, generator=g) * 2, -1)
    y = torch.randint(0, 4, (200,), generator=g)
    for fn, name in ((uq.reliability_diagram, "reliability.png"), (uq.uncertainty_vs_error, "uncertainty.png")):
        path = fn(probs, y, str(tmp_path / name))
        assert path == str(tmp_path / name)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)  # a readable image with something drawn on it
        assert image.ndim == 3 and min(image.shape[:2]) > 100, image.shape
        assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 10, "a blank figure"
