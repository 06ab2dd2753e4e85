# SPDX-License-Identifier: Apache-2.0
"""Plots of calibration and uncertainty, written to files (headless)."""

from __future__ import annotations

import torch

from .metrics import calibration_bins, expected_calibration_error, predictive_entropy

__all__ = ["reliability_diagram", "uncertainty_vs_error"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("Plots need matplotlib: pip install 'pyro-sp[uq]'.") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability_diagram(probs: torch.Tensor, y: torch.Tensor, path: str, num_bins: int = 15, title: str = "") -> str:
    """
    Accuracy against confidence per confidence bin, with the gap to the
    diagonal shaded and the ECE in the legend. Saved to ``path``.
    """
    plt = _pyplot()
    counts, conf, acc = calibration_bins(probs, y, num_bins)
    edges = torch.linspace(0, 1, num_bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    full = counts > 0
    x, a, gap = centers[full].tolist(), acc[full].tolist(), (conf - acc)[full].tolist()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(x, a, width=1 / num_bins, edgecolor="black", label="accuracy")
    ax.bar(x, gap, bottom=a, width=1 / num_bins, color="tab:red", alpha=0.35,
           edgecolor="tab:red", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_xlabel("confidence (max predictive probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ece = expected_calibration_error(probs, y, num_bins)
    ax.set_title(title or f"Reliability (ECE = {ece:.3f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def uncertainty_vs_error(probs: torch.Tensor, y: torch.Tensor, path: str, title: str = "") -> str:
    """
    Accuracy on the retained inputs when the most uncertain ones (by
    predictive entropy) are rejected, against the fraction retained; a useful
    uncertainty makes the curve rise as more is rejected. Saved to ``path``.
    """
    plt = _pyplot()
    p = probs.double().mean(0)
    correct = (p.argmax(-1) == y).double()
    order = torch.argsort(predictive_entropy(probs))  # most certain first
    kept = torch.arange(1, len(order) + 1, dtype=torch.float64)
    acc = correct[order].cumsum(0) / kept
    fraction = kept / len(order)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fraction.tolist(), acc.tolist(), label="rejecting by predictive entropy")
    ax.axhline(correct.mean().item(), color="gray", linestyle="--", label="no rejection")
    ax.set_xlabel("fraction of inputs retained")
    ax.set_ylabel("accuracy on retained inputs")
    ax.set_title(title or "Uncertainty vs error")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
