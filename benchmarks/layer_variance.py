# SPDX-License-Identifier: Apache-2.0
"""Gradient variance of MeanFieldVI's estimators on real data (scikit-learn's digits):
the exact estimator (weights drawn, Pyro's), local reparameterization and Flipout
(:mod:`pyro_sp.nn.layer_estimators`), at a posterior trained with the exact one.

For each network (an MLP 64-128-128-10 and a small CNN), the exact estimator trains
``--train-steps`` steps; then every estimator starts from those parameters and computes
``--replicates`` independent gradients of ``--particles`` particles on one fixed batch
of 128 training digits. Reported per estimator: the mean loss and its standard error,
the total gradient variance (summed over every coordinate) and its ratio to the exact
estimator's, the same per parameter tensor, the largest |z| of the mean gradient against
the exact one's (an unbiasedness check: ~4 is the noise level over this many
coordinates), and the median seconds per gradient (CPU; a ratio, not an absolute).

    python benchmarks/layer_variance.py --out benchmarks/results/layer_variance_digits.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pyro_sp.bench import write_result
from pyro_sp.data import load_digits
from pyro_sp.nn import BayesianModule, MeanFieldVI


def networks():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
                              torch.nn.Linear(128, 10))
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 6 * 6, 10))
    return {"mlp": (mlp, False), "cnn": (cnn, True)}


def gradients(vi, x, y, replicates):
    params = [p for p in vi.parameters() if p.requires_grad]
    losses, grads, seconds = [], [], []
    for _ in range(replicates):
        for p in params:
            p.grad = None
        start = time.perf_counter()
        losses.append(float(vi.loss_and_backward(x, y)))
        seconds.append(time.perf_counter() - start)
        vi._steps += 1  # the next replicate draws the next step's noise
        grads.append([p.grad.reshape(-1).clone() for p in params])
    flat = torch.stack([torch.cat(g) for g in grads])
    return torch.tensor(losses, dtype=torch.float64), flat, [p.numel() for p in params], statistics.median(seconds)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--replicates", type=int, default=200)
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = {"suite": "layer_variance", "data": "scikit-learn digits", "batch": 128, "particles": args.particles,
           "replicates": args.replicates, "train_steps": args.train_steps, "networks": {}}
    for name, (net, images) in networks().items():
        data = load_digits(images=images)
        num_data = len(data.x_train)
        bnn = BayesianModule(net, prior_scale="fan_in")
        common = dict(num_particles=args.particles, num_data=num_data, init_scale=1e-3, seed=0, kl="analytic")
        trained = MeanFieldVI(bnn, **common)
        optim = torch.optim.Adam(trained.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(args.train_steps):
            idx = torch.randint(0, num_data, (128,), generator=g)
            trained.step(optim, data.x_train[idx], data.y_train[idx])
        x, y = data.x_train[:128], data.y_train[:128]
        rows, exact = {}, None
        for estimator in ("exact", "local_reparam", "flipout"):
            vi = MeanFieldVI(bnn, estimator=estimator, **common)
            vi.posterior.load_state_dict(trained.posterior.state_dict())
            vi._seed = 1000  # the same noise streams for every estimator's replicates
            loss, grad, sizes, seconds = gradients(vi, x, y, args.replicates)
            if exact is None:
                exact = (loss, grad)
            var, exact_var = grad.var(0), exact[1].var(0)
            se = (var / len(grad) + exact_var / len(grad)).sqrt().clamp_min(1e-30)
            z = ((grad.mean(0) - exact[1].mean(0)) / se).abs().max()
            per_tensor, start = {}, 0
            names = vi._parameter_names()
            for n, size in zip(names, sizes):
                per_tensor[n] = float(var[start:start + size].sum() / exact_var[start:start + size].sum())
                start += size
            rows[estimator] = {
                "loss_mean": float(loss.mean()), "loss_se": float(loss.std() / len(loss) ** 0.5),
                "gradient_variance_total": float(var.sum()),
                "variance_ratio_vs_exact": float(var.sum() / exact_var.sum()),
                "variance_ratio_per_tensor": per_tensor,
                "max_abs_z_vs_exact": float(z),
                "seconds_per_gradient_median": seconds,
            }
            print(name, estimator, {k: v for k, v in rows[estimator].items() if k != "variance_ratio_per_tensor"},
                  flush=True)
        out["networks"][name] = rows
    if args.out:
        write_result(args.out, out)
    return out


if __name__ == "__main__":
    main()
