# SPDX-License-Identifier: Apache-2.0
"""GPU step time and peak memory of a Bayesian MLP (3072-2048-2048-10, batch
256, mean-field Normal guide, vectorized particles), and its sampling-parallel
scaling over the GPUs of one host with NCCL (not a test; writes JSON).

``single``   one process, one GPU, side by side for each N: Pyro's
             ``Trace_ELBO`` + ``AutoNormal`` on a Pyro-primitive model,
             ``pyro_sp.DistributedTrace_ELBO`` on the same (one process: the
             same computation), and the same network as a
             ``pyro_sp.nn.BayesianModule``.
``scaling``  under torchrun, one process per GPU: sampling-parallel steps with
             N particles in total (strong scaling) or per GPU (weak scaling),
             with the time and bytes of pyro_sp's collectives per step.

Examples::

    python benchmarks/gpu_mlp.py single --particles 8 32 64 --out single.json
    torchrun --nproc-per-node 2 benchmarks/gpu_mlp.py scaling --particles 16 64 --per-gpu 8 32 --out scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyro_sp  # noqa: E402
from benchmarks.core import bnn_model  # noqa: E402
from pyro_sp.distributed.record import record_collectives  # noqa: E402
from pyro_sp.nn import BayesianModule, categorical_likelihood  # noqa: E402

SIZES = (3072, 2048, 2048, 10)
BATCH = 256


def data(device):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(BATCH, SIZES[0], generator=g).to(device)
    y = torch.randint(0, SIZES[-1], (BATCH,), generator=g).to(device)
    return x, y


def module_model(device):
    layers = []
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers.append(nn.ReLU())
    bnn = BayesianModule(nn.Sequential(*layers).to(device), prior_scale="fan_in")

    def model(x, y):
        return categorical_likelihood(bnn(x), y)

    return model


def timed_steps(svi, x, y, warmup: int, steps: int) -> dict:
    for _ in range(warmup):
        svi.step(x, y)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        svi.step(x, y)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {
        "step_ms_median": 1e3 * statistics.median(times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def make_svi(model, loss):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(model, init_scale=0.01)
    return SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=loss)


def single(args) -> dict:
    device = torch.device("cuda")
    x, y = data(device)
    pyro_model = bnn_model(SIZES)
    rows = []
    for n in args.particles:
        row = {"particles": n}
        variants = {
            "pyro_trace_elbo": (pyro_model, lambda: Trace_ELBO(num_particles=n, vectorize_particles=True)),
            "pyro_sp_same_model": (pyro_model, lambda: pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=n)),
            "pyro_sp_bayesian_module": (module_model(device), lambda: pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=n)),
        }
        for name, (model, loss) in variants.items():
            try:
                row[name] = timed_steps(make_svi(model, loss()), x, y, args.warmup, args.steps)
            except torch.OutOfMemoryError:
                row[name] = "out of memory"
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"suite": "single", "device": torch.cuda.get_device_name(), "rows": rows}


def scaling(args) -> dict:
    """Sampling parallelism (all ranks on the sample axis); ``--sample S`` for a
    hybrid grid of S x (world / S), where each data group takes its share of the
    batch; ``--data-parallel`` (= ``--sample 1``): DDP-style data parallelism on
    the same global work, every rank all N particles and 1 / world of the batch."""
    sample = 1 if args.data_parallel else args.sample
    mesh = pyro_sp.init_mesh(sample=sample)
    device = torch.device("cuda", torch.cuda.current_device())
    x, y = data(device)
    if mesh.data > 1:
        x, y = x.tensor_split(mesh.data)[mesh.data_index], y.tensor_split(mesh.data)[mesh.data_index]
    pyro_model = bnn_model(SIZES)
    rows = []
    configs = [("strong", n, n) for n in args.particles] + [("weak", p, p * mesh.sample) for p in args.per_gpu]
    for kind, label, total in configs:
        svi = make_svi(pyro_model, pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=total, mesh=mesh))
        result = timed_steps(svi, x, y, args.warmup, args.steps)
        with record_collectives() as rec:
            for _ in range(3):
                svi.step(x, y)
        count, nbytes, seconds = rec.total("all_reduce_gradients")
        row = {
            "mode": "sample_parallel" if mesh.data == 1 else ("data_parallel" if mesh.sample == 1 else "hybrid"),
            "grid": f"{mesh.sample}x{mesh.data}",
            "batch_per_gpu": x.shape[0],
            "scaling": kind,
            "gpus": mesh.world_size,
            "particles_total": total,
            "particles_per_gpu": total // mesh.sample,
            **result,
            "gradient_all_reduce_per_step": {"count": count / 3, "bytes": nbytes / 3, "ms": 1e3 * seconds / 3},
            "step_check_ms": 1e3 * rec.total("step_check")[2] / 3,
        }
        rows.append(row)
        if mesh.rank == 0:
            print(json.dumps(row), flush=True)
    rank = mesh.rank  # read before the group is gone: afterwards every process reads 0
    if mesh.is_distributed:
        torch.distributed.destroy_process_group()
    return {"suite": "scaling", "device": torch.cuda.get_device_name(), "rows": rows} if rank == 0 else {}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=("single", "scaling"))
    p.add_argument("--particles", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--per-gpu", type=int, nargs="*", default=[8, 32])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--data-parallel", action="store_true", help="scaling: split the batch instead of the particles")
    p.add_argument("--sample", type=int, default=None, help="scaling: sample axis size (default: all ranks)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result = single(args) if args.suite == "single" else scaling(args)
    if result and args.out:
        result["versions"] = {"torch": torch.__version__, "pyro": pyro.__version__, "pyro_sp": pyro_sp.__version__}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
