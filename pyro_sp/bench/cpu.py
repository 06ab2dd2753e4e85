# SPDX-License-Identifier: Apache-2.0
"""CPU benchmarks of pyro_sp on a Bayesian MLP (not a test; writes JSON).

Suites
------
``overhead``  one process, no process group: ``DistributedTrace_ELBO`` against
              the ``Trace_ELBO`` it replaces, same model, same N, paired
              alternating runs; reports the median of per-round ratios.
``step``      times SVI steps in the current launch (alone, or under torchrun):
              per-step median, and every collective of pyro_sp per step, by
              kind (count, bytes, seconds; every kind listed, zero where none
              ran), with their share of the step.
``scaling``   launches, round after round, (a) one process with all N particles
              and one thread, (b) one process with all N and ``--threads``
              threads, (c) ``--nproc`` ranks (torchrun) each with N / nproc
              particles and one thread, and (d) ``--nproc`` independent
              processes with N / nproc particles each, run at the same time
              without any communication: the most this machine can give when
              all its cores are busy (shared caches, memory bandwidth, clock).
              Reports medians, speedups, the parallel efficiency
              ``t(a) / (nproc t(c))``, the hardware ceiling
              ``t(a) / (nproc t(d))`` and the synchronisation efficiency
              ``t(d) / t(c)``: what pyro_sp's collectives cost on top of
              running the shares side by side.
``sync``      gradient synchronisation on ``--nproc`` gloo ranks for the
              mean-field parameters (loc and scale) of the MLP: pyro_sp's two
              gradient strategies, ``"flat"`` (``all_reduce_gradients``,
              ``DistributedTrace_ELBO``'s path; key ``pyro_sp_flat_all_reduce``)
              and ``"bucketed"`` (``BucketedSum``, ``MeanFieldVI``'s; key
              ``ddp_sum_hook``), against ``DistributedDataParallel`` with its
              own averaging hook (``ddp_mean_hook``), each timed as the
              backward of a trivial loss with and without the reduction.

Launches (``scaling``, ``sync``) go through
:func:`pyro_sp.distributed.launch.start_module`; every time comes from
:mod:`pyro_sp.bench.timing`.

Examples::

    pyro-sp bench overhead --out benchmarks/out/overhead.json
    pyro-sp bench cpu-step --nproc 2 --particles 32
    pyro-sp bench cpu-scaling --nproc 2 --out benchmarks/out/scaling.json
    pyro-sp bench sync --nproc 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import pyro_sp
from pyro_sp.bench import write_result
from pyro_sp.bench.timing import collectives_per_step, step_times
from pyro_sp.distributed.launch import start_module
from pyro_sp.distributed.record import record_collectives


def bnn_model(sizes: tuple[int, ...]):
    """A Bayesian MLP with N(0, 1) priors on every weight and bias, vectorizable over particles."""

    def model(x, y):
        h = x
        zero = x.new_zeros(())  # priors on the data's device
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            w = pyro.sample(f"w{i}", dist.Normal(zero, 1.0).expand([fan_in, fan_out]).to_event(2))
            b = pyro.sample(f"b{i}", dist.Normal(zero, 1.0).expand([fan_out]).to_event(1))
            if w.dim() == 4:  # (particles, 1, in, out): drop the data-plate dimension
                w, b = w.squeeze(-3), b.squeeze(-2)
            h = h @ (w / fan_in**0.5) + b.unsqueeze(-2)
            if i < len(sizes) - 2:
                h = torch.relu(h)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=h), obs=y)

    return model


def make_problem(args):
    sizes = tuple(int(s) for s in args.sizes.split(","))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, sizes[0], generator=g)
    y = torch.randint(0, sizes[-1], (args.batch,), generator=g)
    return bnn_model(sizes), x, y


def time_steps(svi, x, y, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` ``svi.step(x, y)`` after ``warmup`` (:func:`~pyro_sp.bench.timing.step_times`)."""
    return step_times(lambda: svi.step(x, y), warmup=warmup, steps=steps)[0]


def new_svi(model, loss, seed=0):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoNormal(model, init_scale=0.05)
    return SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=loss)


# ---- suites -------------------------------------------------------------------------
def overhead(args) -> dict:
    """Paired steps: each pair runs one step of each estimator, in alternating order."""
    torch.set_num_threads(args.threads)
    model, x, y = make_problem(args)
    store = pyro.get_param_store()
    estimators = {
        "pyro_sp": pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=args.particles),
        "pyro": Trace_ELBO(num_particles=args.particles, vectorize_particles=True),
    }
    svis, scopes = {}, {}
    for name, loss in estimators.items():
        with store.scope() as scopes[name]:
            svis[name] = new_svi(model, loss)
            time_steps(svis[name], x, y, args.warmup, 0)
    times = {name: [] for name in estimators}
    pairs = args.steps * args.rounds
    for i in range(pairs):
        order = list(estimators) if i % 2 == 0 else list(estimators)[::-1]
        for name in order:
            with store.scope(scopes[name]):
                times[name] += time_steps(svis[name], x, y, 0, 1)
    ratios = [a / b for a, b in zip(times["pyro_sp"], times["pyro"])]
    return {
        "suite": "overhead",
        "pairs": pairs,
        "pyro_sp_step_s_median": statistics.median(times["pyro_sp"]),
        "pyro_step_s_median": statistics.median(times["pyro"]),
        "ratio_median": statistics.median(ratios),
        "ratio_quartiles": statistics.quantiles(ratios, n=4),
    }


def step(args) -> dict:
    torch.set_num_threads(args.threads)
    mesh = pyro_sp.init_mesh(backend="gloo")  # CPU tensors, also on hosts with GPUs
    model, x, y = make_problem(args)
    svi = new_svi(model, pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=args.particles, mesh=mesh))
    times = time_steps(svi, x, y, args.warmup, args.steps)
    with record_collectives() as rec:
        timed = time_steps(svi, x, y, 0, args.steps)
    per_step = collectives_per_step(rec, args.steps)  # every kind, zero where none ran
    comm = sum(v["seconds"] for v in per_step.values())
    lo, hi = mesh.particle_share(args.particles)
    result = {
        "suite": "step",
        "world_size": mesh.world_size,
        "threads": args.threads,
        "particles_global": args.particles,
        "particles_local": hi - lo,
        "step_s_median": statistics.median(times),
        "step_s_median_recorded": statistics.median(timed),
        "per_step": per_step,
        "sync_share_of_step": comm / statistics.median(timed) if timed else None,
    }
    rank = mesh.rank  # read before the group is gone: afterwards every process reads 0
    if mesh.is_distributed:
        torch.distributed.destroy_process_group()
    return result if rank == 0 else {}


def _launch(args: list[str], env: dict, nproc: int | None = None, copies: int = 1) -> list[dict]:
    """Run ``copies`` launches of this module with ``args`` at the same time (each one process,
    or ``nproc`` ranks under torchrun: :func:`~pyro_sp.distributed.launch.start_module`);
    return their JSON results."""
    paths, procs = [], []
    for _ in range(copies):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            paths.append(f.name)
        procs.append(start_module("pyro_sp.bench.cpu", args + ["--out", paths[-1]], nproc=nproc, prog="pyro-sp bench",
                                  env=env, stdout=subprocess.DEVNULL))
    for p in procs:
        if p.wait() != 0:
            where = "alone" if nproc is None else f"on {nproc} ranks"
            raise RuntimeError(f"benchmark run failed ({where}): {' '.join(args)}")
    out = []
    for path in paths:
        with open(path) as f:
            out.append(json.load(f))
        os.unlink(path)
    return out


def _sync_worker(args) -> dict:
    """One rank of the ``sync`` suite (under torchrun)."""
    from torch.nn.parallel import DistributedDataParallel

    from pyro_sp.distributed.gradients import BucketedSum, all_reduce_gradients, ddp_without_buffer_sync

    torch.set_num_threads(1)
    mesh = pyro_sp.init_mesh(backend="gloo")  # CPU tensors, also on hosts with GPUs
    group = torch.distributed.group.WORLD
    sizes = tuple(int(s) for s in args.sizes.split(","))
    shapes = [s for a, b in zip(sizes[:-1], sizes[1:]) for s in ((a, b), (b,))] * 2  # locs, then scales
    module = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s)) for s in shapes)
    weights = [torch.randn(s) for s in shapes]

    def loss(params):
        return sum((p * w).sum() for p, w in zip(params, weights))

    def zero():
        for p in module:
            p.grad = None

    def local():
        zero()
        loss(list(module)).backward()

    def flat():
        local()
        for p, g in zip(module, all_reduce_gradients(list(module), [p.grad for p in module], group=group)):
            p.grad = g

    ddp_mean = DistributedDataParallel(_Params(module), **ddp_without_buffer_sync())  # the peer: DDP's own mean
    ddp_sum = BucketedSum(_Params(module), group=group).module  # pyro_sp's "bucketed" strategy

    def through(ddp):
        def run():
            for p in ddp.parameters():
                if p.grad is not None:
                    p.grad.zero_()
            loss(ddp()).backward()
        return run

    variants = {"local_backward": local, "pyro_sp_flat_all_reduce": flat,
                "ddp_mean_hook": through(ddp_mean), "ddp_sum_hook": through(ddp_sum)}
    times = {name: [] for name in variants}
    for i in range(args.warmup + args.steps):  # the variants interleaved, step by step
        for name, fn in variants.items():
            (t,), _ = step_times(fn, steps=1, before=torch.distributed.barrier)
            if i >= args.warmup:
                times[name].append(t)
    collectives = {}
    for name, fn in variants.items():
        with record_collectives() as rec:
            fn()
        collectives[name] = {k: v for k, v in collectives_per_step(rec, 1).items() if v["collectives"]}
    collectives["ddp_mean_hook"] = "DDP's own all-reduce per bucket (1 MB first, then 25 MB); not pyro_sp's, not recorded"
    med = {name: statistics.median(v) for name, v in times.items()}
    base = med["local_backward"]
    numel = sum(p.numel() for p in module)
    result = {
        "suite": "sync",
        "world_size": mesh.world_size,
        "gradient_values": numel,
        "bytes": 4 * numel,
        "median_s": med,
        "reduction_s": {k: v - base for k, v in med.items() if k != "local_backward"},
        "collectives_per_step": collectives,
        "note": "the DDP variants also include DDP's forward bookkeeping; the local baseline allocates gradients",
    }
    rank = mesh.rank  # read before the group is gone: afterwards every process reads 0
    # DDP's reducers hold the group: free them first, or the process may abort at exit
    del variants, ddp_mean, ddp_sum
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return result if rank == 0 else {}


class _Params(torch.nn.Module):
    def __init__(self, params) -> None:
        super().__init__()
        self.params = torch.nn.ParameterList(torch.nn.Parameter(p.detach().clone()) for p in params)

    def forward(self):
        return list(self.params)


def sync(args) -> dict:
    worker = ["sync-worker", "--sizes", args.sizes, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    return _launch(worker, dict(os.environ, OMP_NUM_THREADS="1"), nproc=args.nproc)[0]


def scaling(args) -> dict:
    common = [
        "step", "--particles", str(args.particles), "--sizes", args.sizes, "--batch", str(args.batch),
        "--warmup", str(args.warmup), "--steps", str(args.steps),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    share = list(common)
    share[share.index("--particles") + 1] = str(args.particles // args.nproc)
    ranks, alone = f"{args.nproc}_ranks_1_thread", f"{args.nproc}_independent_shares_1_thread"
    runs = {"one_process_1_thread": [], f"one_process_{args.threads}_threads": [], ranks: [], alone: []}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        runs["one_process_1_thread"] += _launch(common + ["--threads", "1"], env)
        runs[f"one_process_{args.threads}_threads"] += _launch(
            common + ["--threads", str(args.threads)], dict(env, OMP_NUM_THREADS=str(args.threads))
        )
        runs[ranks] += _launch(common + ["--threads", "1"], env, nproc=args.nproc)
        # a synchronous job runs at the pace of its slowest share
        slowest = max(_launch(share + ["--threads", "1"], env, copies=args.nproc), key=lambda r: r["step_s_median"])
        runs[alone].append(slowest)
    med = {k: statistics.median(r["step_s_median"] for r in v) for k, v in runs.items()}
    t1, tt, tp, tc = med.values()
    dist_runs = runs[ranks]
    return {
        "suite": "scaling",
        "config": vars(args),
        "median_step_s": med,
        "speedup_ranks_vs_1_thread": t1 / tp,
        "parallel_efficiency": t1 / (tp * args.nproc),
        "hardware_ceiling_efficiency": t1 / (tc * args.nproc),
        "sync_efficiency": tc / tp,
        "speedup_ranks_vs_threads": tt / tp,
        "speedup_threads_vs_1_thread": t1 / tt,
        "sync_share_of_step": statistics.median(r["sync_share_of_step"] for r in dist_runs),
        "gradient_all_reduce_per_step": dist_runs[-1]["per_step"]["all_reduce_gradients"],
        "step_check_per_step": dist_runs[-1]["per_step"]["step_check"],
        "collectives_per_step": dist_runs[-1]["per_step"],
        "runs": runs,
    }


def run(argv=None, prog: str | None = None) -> dict:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=["overhead", "step", "scaling", "sync", "sync-worker"])
    p.add_argument("--particles", type=int, default=32)
    p.add_argument("--sizes", default="64,256,256,10", help="layer widths of the Bayesian MLP")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1; scaling: 2)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="a small MLP, few steps and one round (a smoke run)")
    p.add_argument("--out", default=None, help="JSON file to write (rank 0)")
    args = p.parse_args(argv)
    if args.tiny:
        args.sizes, args.batch, args.particles = "16,32,32,4", 16, min(args.particles, 4)
        args.warmup, args.steps, args.rounds = 1, 3, 1
    if args.threads is None:
        args.threads = 2 if args.suite == "scaling" else 1
    suites = {"overhead": overhead, "step": step, "scaling": scaling, "sync": sync, "sync-worker": _sync_worker}
    result = suites[args.suite](args)
    if result:
        result.setdefault("versions", {"torch": torch.__version__, "pyro": pyro.__version__, "pyro_sp": pyro_sp.__version__})
        if args.out:
            write_result(args.out, result)
    return result


if __name__ == "__main__":
    run()  # a rank under torchrun exits cleanly through pyro_sp.distributed.mesh's teardown
