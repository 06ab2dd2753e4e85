# SPDX-License-Identifier: Apache-2.0
# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # A Bayesian neural network from any `nn.Module`, and what its uncertainty is worth
#
# `pyro_sp.nn.BayesianModule` turns an ordinary PyTorch network into a Pyro
# model: every chosen parameter gets a Normal prior and becomes a sample
# site, and the forward pass runs all particles at once (`torch.func.vmap`),
# so any layer works, convolutions included. We train two networks on
# scikit-learn's 8 × 8 digits, **with the digits 8 and 9 held out of
# training**, and ask whether the network knows what it does not know:
#
# * an MLP (64 → 128 → 8) and a small CNN (two 3 × 3 convolutions), both
#   fully Bayesian, 16 particles per step;
# * each trained two ways that compute the same estimator: the general path
#   (`AutoNormal` + `DistributedTraceMeanField_ELBO` + `SVI`, any Pyro
#   program) and `MeanFieldVI`, which fuses the step into a few tensor
#   programs (faster; Normal priors and a mean-field guide only).
#
# For each we report accuracy, NLL, Brier score and ECE on held-out digits
# 0–7, a reliability diagram, accuracy when the most uncertain inputs are
# rejected, and the epistemic uncertainty (mutual information between the
# prediction and the weights) on three kinds of input: digits 0–7 it has not
# seen, the digits 8 and 9 it has never seen a class of, and noise images.
#
#     python tutorials/bnn_digits.py
#     torchrun --nproc-per-node 2 tutorials/bnn_digits.py   # 8 particles per rank

# %%
import pyro
import torch
from pyro.infer import SVI
from pyro.infer.autoguide import AutoNormal
from torch import nn

import pyro_sp
from pyro_sp.nn import BayesianModule, MeanFieldVI, categorical_likelihood
from _common import OUT, Clock, finish, is_main, report, say, steps, SEED

mesh = pyro_sp.init_mesh()
pyro.set_rng_seed(SEED)

digits = pyro_sp.data.load_digits(images=True, seed=0)
known = 8  # classes 0..7 are trained on; 8 and 9 are out of distribution
train = digits.y_train < known
x_train, y_train = digits.x_train[train], digits.y_train[train]
x_test, y_test = digits.x_test[digits.y_test < known], digits.y_test[digits.y_test < known]
x_unseen = digits.x_test[digits.y_test >= known]
g = torch.Generator().manual_seed(1)
x_noise = torch.rand(len(x_test), 1, 8, 8, generator=g) * (torch.rand(len(x_test), 1, 8, 8, generator=g) < 0.4)
num_train = len(x_train)
say(f"{mesh}; {num_train} training digits 0-{known - 1}, {len(x_test)} test, "
    f"{len(x_unseen)} unseen 8s and 9s, {len(x_noise)} noise images")

networks = {
    "MLP": lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, known)),
    "CNN": lambda: nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, known),
    ),
}

# %% [markdown]
# The two training paths. Both use 16 particles, a global minibatch of 128,
# the same prior (standard Normal on every weight) and the same start (the
# guide means at the network's initial weights, guide scales 0.01); the minibatches come from `ShardedBatchSampler` (identical
# on every rank here: all ranks are on the sample axis).

# %%
PARTICLES, SAMPLES = 16, steps(200, 16)
epochs = steps(60, 2)
sampler = pyro_sp.data.ShardedBatchSampler(num_train, 128, mesh=mesh, seed=SEED)


def general_path(net):
    """AutoNormal + DistributedTraceMeanField_ELBO: any Pyro model works this way."""
    pyro.clear_param_store()
    bnn = BayesianModule(net, prior_scale=1.0)

    def model(x, y=None):
        return categorical_likelihood(bnn(x), y, num_data=num_train)

    # start the guide at the network's initial weights (autoguides start a Normal-prior site at 0)
    guide = AutoNormal(model, init_loc_fn=bnn.init_to_module, init_scale=0.01)
    elbo = pyro_sp.DistributedTraceMeanField_ELBO(
        num_particles=PARTICLES, vectorize_particles=True, max_plate_nesting=1, mesh=mesh
    )
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=elbo)
    losses = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        losses.append(sum(svi.step(x_train[i], y_train[i]) for i in sampler) / len(sampler))
    predictive = pyro_sp.DistributedPredictive(model, guide=guide, num_samples=SAMPLES, parallel=True,
                                               return_sites=("probs",), mesh=mesh)

    def predict(x):
        with torch.no_grad():
            return predictive(x)["probs"]

    return losses, predict


def mean_field_path(net):
    """MeanFieldVI: the same estimator, fused."""
    vi = MeanFieldVI(BayesianModule(net, prior_scale=1.0), "categorical", num_particles=PARTICLES,
                     num_data=num_train, init_scale=0.01, mesh=mesh, seed=SEED)
    optimizer = torch.optim.Adam(vi.parameters(), lr=1e-2)
    losses = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        losses.append(sum(float(vi.step(optimizer, x_train[i], y_train[i])) for i in sampler) / len(sampler))

    def predict(x):
        return vi.predict(x, SAMPLES).softmax(-1)

    return losses, predict


# %% [markdown]
# Train the four combinations and measure the uncertainty on each kind of input.

# %%
def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """P(score of an outside input > score of an inside one): 1 separates perfectly, 0.5 is chance."""
    diff = outside.double().unsqueeze(1) - inside.double().unsqueeze(0)
    return ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()


results, probs_of, epistemic_of, curves = {}, {}, {}, {}
for net_name, make in networks.items():
    for path_name, train_fn in (("general", general_path), ("MeanFieldVI", mean_field_path)):
        torch.manual_seed(SEED)  # the same initial network for both paths
        clock = Clock()
        losses, predict = train_fn(make())
        seconds = clock()
        probs = {name: predict(x) for name, x in (("test", x_test), ("unseen", x_unseen), ("noise", x_noise))}
        epistemic = {name: pyro_sp.uq.mutual_information(p) for name, p in probs.items()}
        key = f"{net_name} {path_name}"
        results[key] = {
            **pyro_sp.uq.classification_report(probs["test"], y_test),
            "seconds": seconds,
            "seconds_per_step": seconds / (epochs * len(sampler)),
            "final_loss": losses[-1],
            "epistemic_unseen": epistemic["unseen"].mean().item(),
            "epistemic_noise": epistemic["noise"].mean().item(),
            "auroc_unseen": auroc(epistemic["test"], epistemic["unseen"]),
            "auroc_noise": auroc(epistemic["test"], epistemic["noise"]),
        }
        probs_of[key], epistemic_of[key], curves[key] = probs, epistemic, losses
        r = results[key]
        say(f"{key:16s} acc {r['accuracy']:.3f} NLL {r['nll']:.3f} ECE {r['ece']:.3f} | epistemic "
            f"test {r['epistemic']:.3f} unseen {r['epistemic_unseen']:.3f} noise {r['epistemic_noise']:.3f} "
            f"| AUROC unseen {r['auroc_unseen']:.2f} noise {r['auroc_noise']:.2f} | {r['seconds_per_step'] * 1e3:.0f} ms/step")

# %% [markdown]
# The figures: reliability and accuracy-vs-rejection of the CNN (general
# path), and the epistemic uncertainty on the three kinds of input.

# %%
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

if is_main():
    os.makedirs(OUT, exist_ok=True)
    best = "CNN general"
    pyro_sp.uq.reliability_diagram(probs_of[best]["test"], y_test, os.path.join(OUT, "bnn_reliability.png"),
                                   title=f"{best}: reliability on digits 0-7")
    pyro_sp.uq.uncertainty_vs_error(probs_of[best]["test"], y_test, os.path.join(OUT, "bnn_rejection.png"),
                                    title=f"{best}: accuracy vs rejection")
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3), sharey=True)
    for ax, (key, epistemic) in zip(axes, epistemic_of.items()):
        for name, mi in epistemic.items():
            ax.hist(mi.numpy(), bins=30, histtype="step", density=True, label=name)
        ax.set(title=key, xlabel="epistemic uncertainty (nats)")
    axes[0].set_ylabel("density")
    axes[0].legend(title="inputs")
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "bnn_epistemic.png"), dpi=110)

report("bnn_digits", particles=PARTICLES, samples=SAMPLES, epochs=epochs, results=results)
for key, losses in curves.items():
    assert losses[-1] < losses[0], f"{key}: the loss did not fall"
finish()
