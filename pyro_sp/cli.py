# SPDX-License-Identifier: Apache-2.0
"""The ``pyro-sp`` command.

``pyro-sp demo``  trains a Bayesian network on the bundled digits with
                  sampling parallelism on local ranks that it launches itself
                  (through ``torch.distributed.run``), then prints accuracy,
                  NLL and ECE and writes a reliability diagram and an
                  uncertainty figure.
``pyro-sp info``  versions, backends, devices, and the mesh under torchrun.
``pyro-sp bench`` runs a named benchmark suite and prints a table
                  (``pyro-sp bench --help`` lists the suites).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyro-sp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a Bayesian MLP on the bundled digits with sampling parallelism")
    demo.add_argument("--nproc", type=int, default=None,
                      help="local ranks to launch (default 2; under torchrun: its world size)")
    demo.add_argument("--sample", type=int, default=None, help="sample axis size (default: all ranks)")
    demo.add_argument("--data", type=int, default=None, help="data axis size (default: nproc // sample)")
    demo.add_argument("--particles", type=int, default=16, help="global number of particles (default 16)")
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--batch", type=int, default=128, help="minibatch size per data group")
    demo.add_argument("--lr", type=float, default=0.03)
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    demo.add_argument("--out", default="pyro-sp-demo", help="folder for figures, metrics and checkpoint")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-augment", action="store_true", help="train on the raw images")
    demo.add_argument("--p-shift", type=float, default=0.25, help="probability of shifting an image by a pixel")
    demo.add_argument("--noise", type=float, default=0.1, help="scale of the Gaussian pixel noise")
    demo.add_argument("--same-augmentation", action="store_true",
                      help="augment identically on every sample rank (default: independently)")
    demo.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: at the end only)")
    demo.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    demo.add_argument("--timeout", type=float, default=300.0, help="seconds before a stuck collective fails")
    demo.add_argument("--predictive-samples", type=int, default=64)
    sub.add_parser("info", help="versions, backends, devices and mesh")
    sub.add_parser("bench", help="run a benchmark suite and print a table (pyro-sp bench --help)", add_help=False)
    return p


def _validate(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.nproc is None:
        a.nproc = int(os.environ.get("WORLD_SIZE", "2")) if "RANK" in os.environ else 2
    if a.nproc < 1:
        p.error(f"--nproc must be at least 1, got {a.nproc}.")
    if a.sample is None and a.data is None:
        a.sample, a.data = a.nproc, 1
    elif a.sample is None:
        if a.data < 1 or a.nproc % a.data:
            p.error(f"--data {a.data} must divide --nproc {a.nproc}.")
        a.sample = a.nproc // a.data
    elif a.data is None:
        if a.sample < 1 or a.nproc % a.sample:
            p.error(f"--sample {a.sample} must divide --nproc {a.nproc} (e.g. --sample 1, 2 or {a.nproc}).")
        a.data = a.nproc // a.sample
    if a.sample < 1 or a.data < 1 or a.sample * a.data != a.nproc:
        p.error(f"--sample {a.sample} times --data {a.data} must equal --nproc {a.nproc}.")
    if a.particles < a.sample:
        p.error(f"--particles {a.particles} must be at least --sample {a.sample}: every sample rank needs a particle.")
    for name in ("epochs", "batch", "predictive_samples"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}.")
    if a.predictive_samples < a.sample:
        p.error(f"--predictive-samples must be at least --sample {a.sample}.")
    if a.device in ("auto", "cuda"):
        import torch

        if a.device == "auto":  # CUDA when every rank gets a GPU, else the CPU
            a.device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= a.nproc else "cpu"
    if a.device == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda asked for, but CUDA is not available here.")
        if torch.cuda.device_count() < a.nproc:
            p.error(f"--device cuda needs one GPU per rank: {a.nproc} ranks, {torch.cuda.device_count()} GPUs.")


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less ``--nproc``: the launcher's parser would take it for its ``--nproc-per-node``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _check_demo_dependencies(p: argparse.ArgumentParser) -> None:
    """Fail before launching any rank when the demo's extra is not installed (once, not per rank)."""
    import importlib.util

    missing = [pip for module, pip in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"))
               if importlib.util.find_spec(module) is None]
    if missing:
        p.error(f"the demo needs {' and '.join(missing)}, which are not installed. "
                "Install them with: pip install 'pyro-sp[demo]'")


def _demo(a: argparse.Namespace) -> int:
    import pyro
    import torch
    import torch.distributed as dist
    from pyro.infer import SVI
    from pyro.infer.autoguide import AutoNormal
    from torch import nn

    import pyro_sp
    from pyro_sp.data import Augmenter, ShardedBatchSampler, load_digits, random_shift_and_noise
    from pyro_sp.nn import BayesianModule, categorical_likelihood
    from pyro_sp.train import MetricsLog, fit

    use_cuda = a.device == "cuda"  # "auto" was resolved by _validate
    mesh = pyro_sp.init_mesh(
        sample=a.sample,
        data=a.data,
        backend="nccl" if use_cuda else "gloo",
        timeout=datetime.timedelta(seconds=a.timeout),
    )
    master = mesh.rank == 0
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if not use_cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, a.nproc)))
    os.makedirs(a.out, exist_ok=True)
    checkpoint = os.path.join(a.out, "checkpoint.pt")
    if master and not a.resume:
        for name in ("checkpoint.pt", "metrics.jsonl"):
            if os.path.exists(os.path.join(a.out, name)):
                os.remove(os.path.join(a.out, name))
    if mesh.is_distributed:
        dist.barrier()

    pyro.set_rng_seed(a.seed)
    data = load_digits(images=True, seed=a.seed)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    sampler = ShardedBatchSampler(len(x_train), a.batch, mesh=mesh, seed=a.seed)
    # mild augmentation: an 8 x 8 digit shifted by a pixel is a much harder digit
    shift_and_noise = functools.partial(random_shift_and_noise, max_shift=1, p_shift=a.p_shift, noise=a.noise)
    augment = None if a.no_augment else Augmenter(
        shift_and_noise, mesh=mesh, seed=a.seed, independent=not a.same_augmentation
    )

    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    bnn = BayesianModule(net.to(device), prior_scale=1.0)

    def model(x, y=None):
        return categorical_likelihood(bnn(x), y, num_data=len(x_train))

    guide = AutoNormal(model, init_scale=0.01)
    elbo = pyro_sp.DistributedTraceMeanField_ELBO(
        num_particles=a.particles, mesh=mesh, vectorize_particles=True, max_plate_nesting=1  # the data plate
    )
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": a.lr, "lrd": 0.999}), loss=elbo)

    def batch(idx):
        idx = idx.to(device)
        x = x_train[idx]
        return (augment(x) if augment is not None else x), y_train[idx]

    if master:
        print(f"pyro-sp demo: {mesh.world_size} rank(s), sample={mesh.sample} x data={mesh.data}, "
              f"{a.particles} particles ({'/'.join(str(h - l) for l, h in [mesh.particle_share(a.particles)])} "
              f"on rank 0), device {device.type}, {len(x_train)} training / {len(x_test)} test digits")
    log = MetricsLog(os.path.join(a.out, "metrics.jsonl"), mesh=mesh)
    result = fit(
        svi, sampler, batch, epochs=a.epochs, mesh=mesh, elbo=elbo, checkpoint=checkpoint,
        checkpoint_every=a.checkpoint_every, rank_objects={} if augment is None else {"augment": augment}, log=log,
    )
    predictive = pyro_sp.DistributedPredictive(
        model, guide=guide, num_samples=a.predictive_samples, parallel=True, return_sites=("probs",), mesh=mesh
    )
    with torch.no_grad():
        probs = predictive(x_test)["probs"].cpu()
    report = pyro_sp.uq.classification_report(probs, y_test.cpu())
    if master:
        figures = [
            pyro_sp.uq.reliability_diagram(probs, y_test.cpu(), os.path.join(a.out, "reliability.png")),
            pyro_sp.uq.uncertainty_vs_error(probs, y_test.cpu(), os.path.join(a.out, "uncertainty.png")),
        ]
        report.update(steps=result["step"], train_seconds=round(result["seconds"], 2), final_loss=result["loss"])
        with open(os.path.join(a.out, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        if result["resumed_from"] is not None:
            print(f"resumed from the checkpoint at step {result['resumed_from']}")
        print(
            f"test accuracy {report['accuracy']:.3f}  NLL {report['nll']:.3f}  ECE {report['ece']:.3f}  "
            f"Brier {report['brier']:.3f}  (epistemic {report['epistemic']:.3f}, aleatoric {report['aleatoric']:.3f} nats)"
        )
        print(f"reliability diagram: {figures[0]}\nuncertainty figure:  {figures[1]}")
        print(f"metrics: {os.path.join(a.out, 'metrics.jsonl')}, report: {os.path.join(a.out, 'report.json')}")
    if mesh.is_distributed:
        dist.destroy_process_group()
    return 0


def _info() -> int:
    import pyro
    import torch
    import torch.distributed as dist

    import pyro_sp

    print(f"pyro_sp {pyro_sp.__version__}, pyro {pyro.__version__}, torch {torch.__version__}, "
          f"python {platform.python_version()} on {platform.machine()}")
    cuda = torch.cuda.is_available()
    print(f"CUDA: {'available, ' + str(torch.cuda.device_count()) + ' device(s)' if cuda else 'not available'}")
    backends = [b for b, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available())) if ok]
    print(f"distributed backends: {', '.join(backends) or 'none'}; default here: {'nccl' if cuda else 'gloo'}")
    if "RANK" in os.environ:
        mesh = pyro_sp.init_mesh()
        print(f"rank {mesh.rank}: {mesh}")
        dist.destroy_process_group()
    else:
        print("mesh: single process (run under torchrun to see the distributed mesh)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from pyro_sp.bench import main as bench

        return bench(argv[1:])
    parser = _parser()
    a = parser.parse_args(argv)
    if a.command == "info":
        return _info()
    _validate(parser, a)
    _check_demo_dependencies(parser)
    if a.nproc > 1 and "RANK" not in os.environ:
        from pyro_sp.distributed.launch import launch_module

        return launch_module("pyro_sp.cli", _without_nproc(argv), a.nproc)
    return _demo(a)


if __name__ == "__main__":
    sys.exit(main())
