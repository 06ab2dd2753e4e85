# SPDX-License-Identifier: Apache-2.0
"""``pyro_sp.train.fit`` over ``MeanFieldVI`` steps on one GPU: each step's loss read one step
late (fit's default for a CUDA loss) against every loss read as its step returns (what fit does
when it is given ``on_step``), beside the step alone (``pyro-sp bench gpu-single``'s
synchronised and back-to-back times). The MLP 3072→2048→2048→10, batch 256, synthetic data
(``steps`` distinct batches, on the device; the batch function moves the sampler's indices
through pinned memory with ``non_blocking=True``, which does not wait for the device), TF32,
fused Adam.

    python benchmarks/fit_overlap.py --particles 32 --variant fused_regenerated_graphs --out fit_overlap.json

The two ways of reading take turns, ``--rounds`` epochs each, after one epoch of warm-up
(compilation, capture); each epoch's time is fit's own (``seconds`` over ``step``).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from pyro_sp.bench import write_result
from pyro_sp.bench.gpu import mean_field
from pyro_sp.bench.models import MLP_BATCH, MLP_SIZES, mlp, synthetic_data
from pyro_sp.bench.timing import timed
from pyro_sp.data import ShardedBatchSampler
from pyro_sp.distributed.mesh import default_mesh
from pyro_sp.nn import BayesianModule
from pyro_sp.train import fit


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--particles", type=int, default=32)
    p.add_argument("--variant", default="fused_regenerated_graphs")
    p.add_argument("--steps", type=int, default=100, help="steps (batches) per epoch")
    p.add_argument("--rounds", type=int, default=3, help="epochs of each way of reading, taking turns")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fit_overlap.py measures a CUDA loss read late: it needs a CUDA device.")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda", torch.cuda.current_device())
    mesh = default_mesh()
    torch.manual_seed(0)
    vi, optim = mean_field(a.variant, BayesianModule(mlp(MLP_SIZES).to(device), prior_scale="fan_in"),
                           a.particles, device, fused_adam=True)
    x, y = synthetic_data((MLP_SIZES[0],), MLP_SIZES[-1], a.steps * MLP_BATCH, device)
    sampler = ShardedBatchSampler(len(x), MLP_BATCH, mesh=mesh)

    def batch(idx):
        idx = idx.pin_memory().to(device, non_blocking=True)
        return x[idx], y[idx]

    def epoch(late: bool) -> float:
        result = fit(lambda xb, yb: vi.step(optim, xb, yb), sampler, batch, epochs=1, mesh=mesh, progress=False,
                     on_step=None if late else (lambda n: None))
        return 1e3 * result["seconds"] / result["step"]

    epoch(True)  # warm-up: compilation and capture
    times = {"late": [], "at_once": []}
    for _ in range(a.rounds):
        for way in times:
            times[way].append(epoch(way == "late"))
    alone = timed(lambda: vi.step(optim, x[:MLP_BATCH], y[:MLP_BATCH]), steps=a.steps, warmup=3, device=device,
                  back_to_back=a.rounds)
    result = {
        "script": "fit_overlap", "variant": a.variant, "particles": a.particles, "steps": a.steps,
        "device": torch.cuda.get_device_name(),
        "fit_ms_late": statistics.median(times["late"]), "fit_ms_at_once": statistics.median(times["at_once"]),
        "fit_ms_rounds": times, "step_ms_median": alone["step_ms_median"],
        "step_ms_back_to_back": alone["step_ms_back_to_back"],
    }
    print(json.dumps(result), flush=True)
    write_result(a.out, result)
    return result


if __name__ == "__main__":
    main()
