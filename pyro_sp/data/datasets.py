# SPDX-License-Identifier: Apache-2.0
"""Real data sets that ship inside packages (no download at run time)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Split", "load_digits", "load_sunspots"]


@dataclass
class Split:
    """Train and test tensors of a data set."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _split(x, y, test_fraction: float, seed: int, shuffle: bool = True) -> Split:
    n = len(x)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g, device="cpu") if shuffle else torch.arange(n, device="cpu")
    cut = n - int(round(test_fraction * n))
    return Split(x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]])


def load_digits(test_fraction: float = 1 / 6, seed: int = 0, images: bool = False) -> Split:
    """
    scikit-learn's bundled handwritten digits: 1 797 images of 8 × 8 pixels,
    10 classes, pixel values scaled to [0, 1]. ``images=True`` keeps the
    ``(N, 1, 8, 8)`` layout (for augmentation and CNNs), else ``(N, 64)``.
    Needs scikit-learn (``pip install "pyro-sp[data]"``).
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("load_digits needs scikit-learn: pip install 'pyro-sp[data]'.") from e
    data = sk_load_digits()
    x = torch.tensor(data.images if images else data.data, dtype=torch.float32) / 16.0
    if images:
        x = x.unsqueeze(1)
    return _split(x, torch.tensor(data.target), test_fraction, seed)


def load_sunspots(window: int = 24, test_fraction: float = 0.2) -> Split:
    """
    Yearly sunspot numbers 1700–2008 from statsmodels, as windowed regression:
    predict year ``t`` from the ``window`` years before it (standardised with
    the training part's mean and deviation). The test part is the last
    ``test_fraction`` of the years: a forecast, not a shuffled split.
    Needs statsmodels (``pip install "pyro-sp[data]"``).
    """
    try:
        from statsmodels.datasets import sunspots
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("load_sunspots needs statsmodels: pip install 'pyro-sp[data]'.") from e
    series = torch.tensor(sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(), dtype=torch.float32)
    cut = int(len(series) * (1 - test_fraction))
    mean, std = series[:cut].mean(), series[:cut].std()
    z = (series - mean) / std
    x = z.unfold(0, window, 1)[:-1]
    y = z[window:]
    return _split(x, y, test_fraction, seed=0, shuffle=False)
