# SPDX-License-Identifier: Apache-2.0
# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # A variational autoencoder, and its importance-weighted bound
#
# Pyro's VAE tutorial trains an encoder (the guide) and a decoder (the model)
# on binarized MNIST with `Trace_ELBO`. Here the images are scikit-learn's
# bundled 8 × 8 digits, binarized at half intensity (1 497 for training, 300
# held out), and we train the same VAE twice:
#
# * with the ELBO (`Trace_ELBO`), 16 particles per image;
# * with the importance-weighted bound (IWAE: `RenyiELBO` with α = 0), 16
#   particles per image. The bound is a log-mean-exp over the particles, so
#   it is not a sum that ranks could add up: pyro_sp gathers each particle's
#   log-weight and forms the single-process bound exactly.
#
# Both are scored by the importance-weighted bound with 512 particles on the
# held-out images, an estimate of their log-likelihood that is itself split
# over the sample axis.
#
# **What changes for pyro_sp:** the two estimator lines, `init_mesh`, and a
# sharded minibatch sampler (each data group draws its own minibatches from
# its part of the data set; with one process it is an ordinary shuffled
# loader). The data plate says how many images there are, so each group's
# minibatch estimate is unbiased and the groups' estimates average.
#
#     python tutorials/vae.py
#     torchrun --nproc-per-node 2 tutorials/vae.py                                # 2 x 1: particles split
#     PYRO_SP_TUTORIAL_MESH=1x2 torchrun --nproc-per-node 2 tutorials/vae.py      # 1 x 2: data split
#     PYRO_SP_TUTORIAL_MESH=2x2 torchrun --nproc-per-node 4 tutorials/vae.py      # both

# %%
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI
from pyro.optim import Adam
from torch import nn

import pyro_sp
from _common import Clock, finish, mesh_shape, report, savefig, say, steps, SEED

mesh = pyro_sp.init_mesh(**mesh_shape())  # added
pyro.set_rng_seed(SEED)

digits = pyro_sp.data.load_digits(seed=0)
x_train = (digits.x_train > 0.5).float()
x_test = (digits.x_test > 0.5).float()
num_train = len(x_train)
say(f"{mesh}; {num_train} training and {len(x_test)} test images of 64 binary pixels")


# %% [markdown]
# The model and guide are the tutorial's, written for any number of leading
# particle dimensions (`nn.Linear` broadcasts) so the particles vectorize.
# The plate is told the data set's size and this minibatch's indices.

# %%
class Encoder(nn.Module):
    def __init__(self, z_dim, hidden):
        super().__init__()
        self.fc = nn.Linear(64, hidden)
        self.loc = nn.Linear(hidden, z_dim)
        self.log_scale = nn.Linear(hidden, z_dim)

    def forward(self, x):
        h = nn.functional.softplus(self.fc(x))
        return self.loc(h), self.log_scale(h).exp()


class Decoder(nn.Module):
    def __init__(self, z_dim, hidden):
        super().__init__()
        self.fc = nn.Linear(z_dim, hidden)
        self.out = nn.Linear(hidden, 64)

    def forward(self, z):
        return self.out(nn.functional.softplus(self.fc(z)))  # logits of the pixels


class VAE(nn.Module):
    def __init__(self, z_dim=8, hidden=256):
        super().__init__()
        self.encoder, self.decoder, self.z_dim = Encoder(z_dim, hidden), Decoder(z_dim, hidden), z_dim

    def model(self, x, idx, num_data):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", num_data, subsample=idx):
            prior = dist.Normal(x.new_zeros(len(x), self.z_dim), 1.0).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x, idx, num_data):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", num_data, subsample=idx):
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


# %% [markdown]
# Training: the only pyro_sp-specific line is the estimator. The global
# minibatch has 128 images; with a data axis of size D each data group takes
# 128 / D of them from its own shard.

# %%
PARTICLES = 16
estimators = {
    # was: Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1)
    "ELBO": lambda: pyro_sp.DistributedTrace_ELBO(
        num_particles=PARTICLES, vectorize_particles=True, max_plate_nesting=1, mesh=mesh
    ),
    # was: RenyiELBO(alpha=0, num_particles=16, vectorize_particles=True, max_plate_nesting=1)
    "IWAE": lambda: pyro_sp.DistributedRenyiELBO(
        alpha=0.0, num_particles=PARTICLES, vectorize_particles=True, max_plate_nesting=1, mesh=mesh
    ),
}
EVAL_PARTICLES = steps(512, 16)
evaluator = pyro_sp.DistributedRenyiELBO(
    alpha=0.0, num_particles=EVAL_PARTICLES, vectorize_particles=True, max_plate_nesting=1, mesh=mesh
)
test_idx = torch.arange(len(x_test))


def test_nll(vae):
    """-log p(x) per held-out image, bounded above by IWAE with EVAL_PARTICLES particles."""
    with torch.no_grad():
        return evaluator.loss(vae.model, vae.guide, x_test, test_idx, len(x_test)) / len(x_test)


epochs = steps(40, 2)
sampler = pyro_sp.data.ShardedBatchSampler(num_train, 128 // mesh.data, mesh=mesh, seed=SEED)
results, curves, vaes = {}, {}, {}
for name, make in estimators.items():
    pyro.set_rng_seed(SEED)
    pyro.clear_param_store()
    vae = VAE()
    svi = SVI(vae.model, vae.guide, Adam({"lr": 3e-3}), loss=make())
    clock, curve = Clock(), []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        total = 0.0
        for idx in sampler:
            total += svi.step(x_train[idx], idx, num_train)
        curve.append(total / len(sampler) / num_train)  # per image, averaged over the epoch's steps
        if epoch % 10 == 0 or epoch == epochs - 1:
            say(f"{name} epoch {epoch:2d}: loss per image {curve[-1]:.3f}")
    seconds = clock()
    results[name] = {"train_loss": curve[-1], "test_nll_bound": test_nll(vae), "seconds": seconds}
    curves[name], vaes[name] = curve, vae
    say(f"{name}: {seconds:.1f} s; held-out -log p(x) <= {results[name]['test_nll_bound']:.3f} nats per image")

# %% [markdown]
# IWAE's training objective is a tighter bound than the ELBO; whether the
# model it learns scores better on the held-out bound depends on the seed at
# this size (tutorials/README.md has three). Below: the training curves, and held-out digits with their
# reconstructions (decoder of the encoder's mean).

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [1, 1.4]})
for name, curve in curves.items():
    axes[0].plot(range(1, len(curve) + 1), curve, label=f"{name} ({PARTICLES} particles)")
axes[0].set(xlabel="epoch", ylabel="training loss per image (nats)", title="training")
axes[0].legend()
with torch.no_grad():
    shown = x_test[:8]
    rows = [shown] + [torch.sigmoid(v.decoder(v.encoder(shown)[0])) for v in vaes.values()]
grid = torch.cat([torch.cat([im.view(8, 8) for im in row], 1) for row in rows], 0)
axes[1].imshow(grid, cmap="gray_r")
axes[1].set_yticks([4 + 8 * i for i in range(len(rows))], ["held out"] + list(vaes))
axes[1].set_xticks([])
axes[1].set_title("reconstructions")
savefig(fig, "vae")

report(
    "vae",
    particles=PARTICLES,
    eval_particles=EVAL_PARTICLES,
    epochs=epochs,
    **{f"{name}_{key}": value for name, r in results.items() for key, value in r.items()},
)
for name, curve in curves.items():
    assert curve[-1] < curve[0], f"{name}: the loss did not fall"
finish()
