# SPDX-License-Identifier: Apache-2.0
"""MeanFieldVI's ``precision="bf16"`` against fp32 on real data (scikit-learn's digits):
the error of one step's loss and gradients against float64, and what training in each
precision gives (test accuracy, NLL, ECE).

The network is an MLP 64-128-128-10 (``BayesianModule``, N(0, 1) priors), 8 particles,
closed-form KL, Adam (lr 3e-2), 20 epochs of batch 128, the same seed and minibatches for both
precisions. The error is measured at the posterior trained in fp32, with the same pinned
noise in float64, fp32 and bf16 (relative norm of the difference, over 5 batches).
Predictions: 64 posterior draws, in fp32.

    python benchmarks/precision.py --out benchmarks/results/precision_digits.json
"""

from __future__ import annotations

import argparse

import torch

from pyro_sp.bench import write_result
from pyro_sp.data import load_digits
from pyro_sp.nn import BayesianModule, MeanFieldVI
from pyro_sp.uq import classification_report


def build(net, num_data, precision, particles):
    return MeanFieldVI(BayesianModule(net, prior_scale=1.0), num_particles=particles, num_data=num_data,
                       init_scale=0.01, seed=0, kl="analytic", precision=precision)


def train(vi, data, epochs, batch):
    optim = torch.optim.Adam(vi.parameters(), lr=3e-2)
    order = torch.Generator().manual_seed(0)
    n = len(data.x_train)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=order)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            vi.step(optim, data.x_train[idx], data.y_train[idx])
    probs = vi.predict(data.x_test, num_samples=64).softmax(-1)
    return classification_report(probs, data.y_test)


def step_error(trained, net, num_data, data, particles, batches=5):
    """Relative error of loss and gradients against float64 with the same pinned noise."""
    state = trained.posterior.state_dict()
    ref = build(net, num_data, "fp32", particles).double()
    ref.posterior.load_state_dict({k: v.double() for k, v in state.items()})
    out = {}
    for precision in ("fp32", "bf16"):
        vi = build(net, num_data, precision, particles)
        vi.posterior.load_state_dict(state)
        losses, grads = [], []
        g = torch.Generator().manual_seed(1)
        for b in range(batches):
            idx = torch.arange(b * 128, (b + 1) * 128)
            x, y = data.x_train[idx], data.y_train[idx]
            noise = [torch.randn((particles,) + loc.shape, generator=g, dtype=torch.float64) for loc in ref.posterior.locs]
            results = []
            for model, xx, nn in ((ref, x.double(), noise), (vi, x, [n.float() for n in noise])):
                params = [p for p in model.parameters() if p.requires_grad]
                for p in params:
                    p.grad = None
                loss = model.loss_and_backward(xx, y, noise=nn).double()
                results.append((loss, torch.cat([p.grad.double().reshape(-1) for p in params])))
            (l64, g64), (l, gr) = results
            losses.append(float(abs(l - l64) / abs(l64)))
            grads.append(float((gr - g64).norm() / g64.norm()))
        out[precision] = {"loss_relative_error_max": max(losses), "gradient_relative_error_max": max(grads),
                          "gradient_relative_error_mean": sum(grads) / len(grads)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    data = load_digits()
    num_data = len(data.x_train)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
                              torch.nn.Linear(128, 10))
    result = {"suite": "precision", "data": "scikit-learn digits", "epochs": args.epochs, "particles": args.particles,
              "batch": 128, "training": {}}
    trained = {}
    for precision in ("fp32", "bf16"):
        vi = build(net, num_data, precision, args.particles)
        result["training"][precision] = train(vi, data, args.epochs, 128)
        trained[precision] = vi
        print(precision, result["training"][precision], flush=True)
    result["step_error_vs_float64"] = step_error(trained["fp32"], net, num_data, data, args.particles)
    print(result["step_error_vs_float64"], flush=True)
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
