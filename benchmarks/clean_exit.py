# SPDX-License-Identifier: Apache-2.0
"""Launch a short, complete job many times under torchrun and count the
launches that did not exit 0.

The job (``--job``) is what a user's script does: the ELBO path
(``DistributedTrace_ELBO`` with SVI), ``DistributedPredictive`` and
``MeanFieldVI``, on the mesh given, and then it simply ends. Half of the
launches also call ``torch.distributed.destroy_process_group()`` at the end,
as PyTorch's examples do; the other half leave the teardown to the library.

    python benchmarks/clean_exit.py --launches 50            # 50 per mesh shape
    python benchmarks/clean_exit.py --launches 2 --shapes data

Prints a table and writes ``benchmarks/results/clean_exit.json`` (with the
tail of the log of every failed launch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

#: name: (sample, data)
SHAPES = {"sample": (2, 1), "data": (1, 2), "hybrid": (2, 2)}
HERE = os.path.dirname(os.path.abspath(__file__))


def job(sample: int, data: int, destroy: bool) -> None:
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import SVI
    from pyro.infer.autoguide import AutoNormal

    import pyro_sp
    from pyro_sp.nn import BayesianModule, MeanFieldVI

    torch.set_num_threads(1)
    mesh = pyro_sp.init_mesh(sample=sample, data=data)
    pyro.set_rng_seed(0)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(mesh.data_index))
    y = x @ torch.tensor([0.5, -1.0, 2.0])

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("y", dist.Normal((x * w.unsqueeze(-2)).sum(-1), 0.5), obs=y)

    guide = AutoNormal(model)
    elbo = pyro_sp.DistributedTrace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1, mesh=mesh)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=elbo)
    for _ in range(3):
        svi.step(x, y)
    predictive = pyro_sp.DistributedPredictive(model, guide=guide, num_samples=8, mesh=mesh)
    samples = predictive(x)
    assert samples["y"].shape == (8, 16)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    vi = MeanFieldVI(BayesianModule(net), "normal", num_particles=4, mesh=mesh, seed=0)
    opt = torch.optim.Adam(vi.parameters(), lr=0.01)
    for _ in range(3):
        loss = vi.step(opt, x, y)
    assert torch.isfinite(loss)
    if mesh.rank == 0:
        print("job done", flush=True)
    if destroy:
        torch.distributed.destroy_process_group()


def launch(sample: int, data: int, destroy: bool, timeout: float) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={sample * data}",
           os.path.abspath(__file__), "--job", "--sample", str(sample), "--data", str(data)]
    if destroy:
        cmd.append("--destroy")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        code, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, log = -1, f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}"
    return code, log, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launches", type=int, default=50, help="launches per mesh shape")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--out", default=os.path.join(HERE, "results", "clean_exit.json"))
    p.add_argument("--timeout", type=float, default=180.0, help="seconds one launch may take")
    p.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sample", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--data", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--destroy", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.job:
        job(args.sample, args.data, args.destroy)
        return 0
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or args.launches < 1:
        p.error(f"expected --launches >= 1 and shapes of {sorted(SHAPES)}, got {args.launches} and {unknown}")
    results = {}
    for name in shapes:
        sample, data = SHAPES[name]
        failures, seconds = [], []
        for i in range(args.launches):
            code, log, took = launch(sample, data, destroy=i % 2 == 1, timeout=args.timeout)
            seconds.append(took)
            ok = code == 0 and "job done" in log
            if not ok:
                failures.append({"launch": i, "exit_code": code, "log_tail": log[-2500:]})
            print(f"\r{name}: {i + 1}/{args.launches} launches, {len(failures)} failed", end="", flush=True)
        print()
        results[name] = {"sample": sample, "data": data, "launches": args.launches,
                         "failed": len(failures), "median_seconds": sorted(seconds)[len(seconds) // 2],
                         "failures": failures}
    print(f"{'mesh':8} {'sample x data':>13} {'launches':>9} {'non-zero exits':>15}")
    for name, r in results.items():
        print(f"{name:8} {r['sample']:>6} x {r['data']:<5} {r['launches']:>9} {r['failed']:>15}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return 1 if any(r["failed"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
