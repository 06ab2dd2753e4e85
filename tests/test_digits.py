# SPDX-License-Identifier: Apache-2.0
"""A Bayesian MLP on scikit-learn's bundled digits, trained with
DistributedTraceMeanField_ELBO on 2 ranks: >= 90% test accuracy with a small
budget (8 particles, 10 epochs of 10 steps), calibration reported."""

from __future__ import annotations

import pyro
import torch
import torch.distributed as tdist
from pyro.infer.autoguide import AutoNormal
from torch import nn

import pyro_sp
from pyro_sp.nn import BayesianModule, categorical_likelihood

EPOCHS, BATCH, PARTICLES = 10, 150, 8


def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1500]], y[perm[:1500]], x[perm[1500:]], y[perm[1500:]]


def train_digits():
    torch.set_default_dtype(torch.float32)
    mesh = pyro_sp.SPMesh(sample=tdist.get_world_size())
    x, y, x_test, y_test = digits()
    pyro.set_rng_seed(0)
    bnn = BayesianModule(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)))

    def model(x, y=None):
        return categorical_likelihood(bnn(x), y, num_data=len(x_train))

    x_train = x
    guide = AutoNormal(model, init_scale=0.01)
    elbo = pyro_sp.DistributedTraceMeanField_ELBO(vectorize_particles=True, num_particles=PARTICLES, mesh=mesh)
    svi = pyro.infer.SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.03}), loss=elbo)
    order = torch.Generator().manual_seed(1)  # same minibatches on every rank of the sample group
    for _ in range(EPOCHS):
        perm = torch.randperm(len(x), generator=order)
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            svi.step(x[idx], y[idx])
    probs = pyro_sp.DistributedPredictive(
        model, guide=guide, num_samples=64, parallel=True, return_sites=("probs",), mesh=mesh
    )(x_test)["probs"]
    return pyro_sp.uq.classification_report(probs, y_test), probs.mean(0)


def _check_report(results, label: str) -> None:
    """The ranks agree; the report's scores are scikit-learn's on the predictive mean, and good."""
    from sklearn.metrics import accuracy_score, log_loss

    (report, mean), (report1, mean1) = results
    assert report == report1 and torch.equal(mean, mean1), "ranks disagree on the predictive result"
    print(f"digits, 2 ranks, {label}: {report}")
    y_test = digits()[3].numpy()
    mean = mean.double().numpy()
    mean = mean / mean.sum(-1, keepdims=True)  # float32 rounding: sklearn wants rows summing to one
    assert report["accuracy"] == accuracy_score(y_test, mean.argmax(-1))
    assert abs(report["nll"] - log_loss(y_test, mean, labels=range(10))) < 1e-6
    # 0.94-0.96 accuracy, NLL 0.15-0.19 and ECE about 0.05 measured (uniform guessing: NLL 2.30)
    assert report["accuracy"] >= 0.90, report
    assert report["nll"] < 0.35 and report["ece"] < 0.15, report


def test_bayesian_mlp_on_digits(pools):
    _check_report(pools(2).run(train_digits), "DistributedTraceMeanField_ELBO")


def train_digits_fused(kl: str):
    """The same network and budget with MeanFieldVI (the fused step), and its predictions."""
    torch.set_default_dtype(torch.float32)
    mesh = pyro_sp.SPMesh(sample=tdist.get_world_size())
    x, y, x_test, y_test = digits()
    torch.manual_seed(0)
    bnn = BayesianModule(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)))
    vi = pyro_sp.nn.MeanFieldVI(bnn, num_particles=PARTICLES, num_data=len(x), kl=kl, mesh=mesh, seed=0)
    optim = torch.optim.Adam([p for p in vi.parameters() if p.requires_grad], lr=0.03)
    order = torch.Generator().manual_seed(1)
    for _ in range(EPOCHS):
        perm = torch.randperm(len(x), generator=order)
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            vi.step(optim, x[idx], y[idx])
    probs = vi.predict(x_test, 64).softmax(-1)
    return pyro_sp.uq.classification_report(probs, y_test), probs.mean(0)


def test_fused_step_on_digits(pools):
    for kl in ("sample", "analytic"):
        _check_report(pools(2).run(train_digits_fused, kl), f"MeanFieldVI kl={kl}")
