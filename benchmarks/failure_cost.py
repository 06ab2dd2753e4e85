# SPDX-License-Identifier: Apache-2.0
"""What the failure handling costs per step on the fast path: the step time
of ``DistributedTrace_ELBO`` (SVI) and ``MeanFieldVI`` on 2 gloo ranks, for
whatever pyro_sp is on ``PYTHONPATH``, optionally with the NCCL watchdog
thread forced on (it polls the store once a second).

    torchrun --standalone --nproc-per-node 2 benchmarks/failure_cost.py OUT.json [--watchdog]

Run it for two versions side by side (e.g. a checkout of the commit before
the change on ``PYTHONPATH``), alternating, and compare the medians; see
BENCHMARKS.md. The timing loop is this source tree's
``pyro_sp/bench/timing.py``, loaded by its path, so the version measured may
predate it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys


def _timing():
    """This source tree's :mod:`pyro_sp.bench.timing`, whatever pyro_sp is on ``PYTHONPATH``."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyro_sp", "bench", "timing.py")
    spec = importlib.util.spec_from_file_location("_pyro_sp_bench_timing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import SVI
    from pyro.infer.autoguide import AutoNormal

    import pyro_sp
    from pyro_sp.nn import BayesianModule, MeanFieldVI

    step_times = _timing().step_times
    out, watchdog = sys.argv[1], "--watchdog" in sys.argv
    torch.set_num_threads(1)
    mesh = pyro_sp.init_mesh()
    if watchdog:
        from pyro_sp.distributed.failure import start_watchdog

        start_watchdog()
    pyro.set_rng_seed(0)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    y = x @ torch.linspace(-1, 1, 8)

    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([8]).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal((x * w.unsqueeze(-2)).sum(-1), 0.5), obs=y)

    elbo = pyro_sp.DistributedTrace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1, mesh=mesh)
    svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.01}), loss=elbo)
    net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    vi = MeanFieldVI(BayesianModule(net), "normal", num_particles=8, mesh=mesh, seed=0)
    opt = torch.optim.Adam(vi.parameters(), lr=0.01)
    result = {}
    for name, step in (("trace_elbo_svi", lambda: svi.step(x, y)), ("mean_field_vi", lambda: vi.step(opt, x, y))):
        times, _ = step_times(step, warmup=20, steps=300, before=torch.distributed.barrier)
        result[name] = statistics.median(times) * 1e3
    if mesh.rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
