# SPDX-License-Identifier: Apache-2.0
"""Every tutorial runs under torchrun on 2 ranks in its tiny setting, and what it computes is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIALS = os.path.join(ROOT, "tutorials")


def _in_range(value: float, lo: float, hi: float) -> bool:
    return lo <= value <= hi


# tutorial -> a check of its results record (the tutorial asserts its own claims too)
CHECKS = {
    "svi_part_i_coin": lambda r: abs(r["mean"] - r["exact_mean"]) < 0.1 and r["loss_last_50"] < r["loss_first_50"],
    "svi_part_iii_baselines": lambda r: r["grad_std_with_baseline"] < r["grad_std_without_baseline"],
    # a 90 % interval covers about 90 % of the points (0.91 measured; the binomial sd is about 0.02)
    "bayesian_regression": lambda r: _in_range(r["coverage_90"], 0.8, 0.98)
    and max(abs(w - o) for w, o in zip(r["weight_mean"], r["least_squares"])) < 0.3,
    "gmm": lambda r: abs(max(r["weights"]) - 0.625) < 0.05,
    "vae": lambda r: all(_in_range(r[f"{n}_test_nll_bound"], 10.0, 44.4) for n in ("ELBO", "IWAE")),  # 44.4 = 64 log 2
    # the flow fits the skewed posterior better than AutoNormal: a lower -ELBO, by the reported gap
    "flow_guide": lambda r: r["flow_neg_elbo"] < r["autonormal_neg_elbo"]
    and abs(r["kl_gap"] - (r["autonormal_neg_elbo"] - r["flow_neg_elbo"])) < 1e-9 * abs(r["autonormal_neg_elbo"]),
    # the smoke run's 40 steps take the loss down by orders of magnitude (3e5 to 30 measured)
    "forecasting": lambda r: r["loss_last"] < 1e-2 * r["loss_first"],
    # every network and path learns the digits (0.88-0.95 measured), the two paths of one network
    # agree, and total uncertainty = aleatoric + epistemic
    "bnn_digits": lambda r: all(v["accuracy"] > 0.8 for v in r["results"].values())
    and all(
        abs(r["results"][f"{net} general"]["accuracy"] - r["results"][f"{net} MeanFieldVI"]["accuracy"]) < 0.05
        for net in ("MLP", "CNN")
    )
    and all(abs(v["predictive_entropy"] - v["aleatoric"] - v["epistemic"]) < 1e-9 for v in r["results"].values()),
    # all four configurations ran on both tasks, and each learned the digits
    "augmentation_diversity": lambda r: all(len(rows) == 5 for rows in r["summary"].values())
    and all(row["final_accuracy"][0] > 0.7 for c, row in r["summary"]["digits"].items() if not c.startswith("d - c")),
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_tutorial_runs_on_two_ranks(name, tmp_path):
    env = dict(os.environ, PYRO_SP_TUTORIAL_SMOKE="1", PYRO_SP_TUTORIAL_OUT=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("PYRO_SP_TUTORIAL_MESH", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", f"{name}.py"]
    proc = subprocess.run(cmd, cwd=TUTORIALS, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(tmp_path / f"{name}-w2-s0-smoke.json") as f:
        record = json.load(f)
    assert record["world_size"] == 2 and record["smoke"]
    assert CHECKS[name](record), f"{name}: results out of range: {record}"
    # rank 0 alone prints: the results line appears once
    assert proc.stdout.count('"tutorial":') == 1, proc.stdout
