# SPDX-License-Identifier: Apache-2.0
"""A failure after the per-step check reaches every rank within seconds,
names the failing rank and its error, and leaves no rank waiting for the
collective timeout: folded into the next collective where one follows
(the estimators, which then go on), by aborting the process groups where
the others already wait (MeanFieldVI's overlapped reduction)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as tdist

import pyro_sp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMED = [False]


class _FailInBackward(torch.autograd.Function):
    """Identity whose backward raises while ``ARMED`` (an out-of-memory error in backward, simulated)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if ARMED[0]:
            raise RuntimeError("simulated out of memory in backward")
        return grad


def _model():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))


def _guide():
    loc = pyro.param("loc", torch.tensor(0.1))
    pyro.sample("z", dist.Normal(_FailInBackward.apply(loc), 1.0))


def backward_fails_on_rank_1(family: str, kind: str, data: int):
    world = tdist.get_world_size()
    mesh = pyro_sp.SPMesh(sample=world // data, data=data)
    cls = {"renyi": pyro_sp.DistributedRenyiELBO, "trace": pyro_sp.DistributedTrace_ELBO}[family]
    elbo = cls(num_particles=4, vectorize_particles=True, max_plate_nesting=0, mesh=mesh)
    elbo.loss(_model, _guide)  # parameters set up and synchronised
    ARMED[0] = mesh.rank == 1
    outcome = None
    try:
        if kind == "loss_and_grads":
            elbo.loss_and_grads(_model, _guide)
        else:
            elbo.differentiable_loss(_model, _guide).backward()
    except Exception as e:  # noqa: BLE001 - what every rank saw
        outcome = (type(e).__name__, str(e))
    finally:
        ARMED[0] = False
    loc = pyro.param("loc").unconstrained()
    grad_after_failure = loc.grad
    # the job goes on: the next step succeeds on every rank
    loc.grad = None
    loss = elbo.loss_and_grads(_model, _guide)
    return outcome, grad_after_failure, loss, loc.grad.clone()


@pytest.mark.parametrize("family,kind,data", [
    ("renyi", "loss_and_grads", 1), ("renyi", "loss_and_grads", 2), ("trace", "differentiable_loss", 1),
    ("trace", "loss_and_grads", 1),
])
def test_a_failing_backward_is_an_error_on_every_rank_and_the_estimator_goes_on(pools, family, kind, data):
    results = pools(2).run(backward_fails_on_rank_1, family, kind, data)
    (own, grad1, loss1, g1), (other, grad0, loss0, g0) = results[1], results[0]
    assert own == ("RuntimeError", "simulated out of memory in backward")
    assert other[0] == "RankError" and "rank 1: RuntimeError: simulated out of memory in backward" in other[1]
    assert grad0 is None and grad1 is None, "a failed step left a gradient behind"
    assert loss0 == loss1 and torch.equal(g0, g1)


JOB = textwrap.dedent(
    """
    import datetime, json, os, sys, time
    import torch
    import pyro_sp
    from pyro_sp.nn import BayesianModule, MeanFieldVI

    out, case = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    # a long timeout: an error after seconds is pyro_sp's doing, not the timeout's
    mesh = pyro_sp.init_mesh(timeout=datetime.timedelta(seconds=5 if case == "hang" else 90))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    vi = MeanFieldVI(BayesianModule(net), num_particles=4, mesh=mesh, seed=0)
    opt = torch.optim.Adam(vi.parameters(), lr=0.01)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    fail = {"on": False}

    def hook(grad):
        if fail["on"]:
            raise RuntimeError("simulated out of memory in backward")
        return grad

    vi.posterior.locs[0].register_hook(hook)
    for _ in range(2):
        vi.step(opt, x, y)
    record = {"rank": mesh.rank}
    start = time.perf_counter()
    try:
        if mesh.rank == 1 and case == "backward":
            fail["on"] = True
        if mesh.rank == 1 and case == "hang":
            time.sleep(9)  # stops answering, without an error
        bad = x[:, :3] if (mesh.rank == 1 and case == "forward") else x  # a bad batch on one rank
        vi.step(opt, bad, y)
        record["error"] = None
    except Exception as e:
        record["error"] = (type(e).__name__, str(e))
        record["notes"] = getattr(e, "__notes__", [])
    record["seconds"] = time.perf_counter() - start
    fail["on"] = False
    try:
        vi.step(opt, x, y)
        record["next"] = None
    except Exception as e:
        record["next"] = (type(e).__name__, str(e))
    try:
        pyro_sp.init_mesh()
        record["mesh"] = None
    except Exception as e:
        record["mesh"] = (type(e).__name__, str(e))
    with open(os.path.join(out, f"rank{mesh.rank}.json"), "w") as f:
        json.dump(record, f)
    """
)


@pytest.mark.parametrize("case", ["backward", "forward"])
def test_mean_field_failure_stops_every_rank_within_seconds(tmp_path, case):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(script), str(tmp_path), case]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    failing, waiting = ranks[1], ranks[0]
    expected = "simulated out of memory in backward" if case == "backward" else "[2, 3] but got: [2, 4]"
    assert failing["error"][0] == "RuntimeError" and expected in failing["error"][1]
    assert waiting["error"][0] == "RankError"
    assert f"rank 1: RuntimeError: {failing['error'][1]}" in waiting["error"][1]
    assert "MeanFieldVI's step 3" in waiting["error"][1]
    assert waiting["seconds"] < 10, f"the waiting rank took {waiting['seconds']:.1f} s (the timeout is 90 s)"
    for r in ranks:  # no rank can go on as if nothing happened, or quietly as one process
        assert r["next"][0] == "RuntimeError" and "MeanFieldVI cannot take step 3" in r["next"][1]
        assert "rank 1" in r["next"][1] and "Restart the job" in r["next"][1]
        assert r["mesh"][0] == "RuntimeError" and "stopped this job's process groups" in r["mesh"][1]


def test_a_rank_that_stops_answering_is_a_timeout_error_naming_it(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(script), str(tmp_path), "hang"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    waiting = json.loads((tmp_path / "rank0.json").read_text())
    assert waiting["error"][0] == "RuntimeError", waiting
    assert 4 < waiting["seconds"] < 12, waiting["seconds"]  # init_mesh(timeout=5 s), not longer
    assert any("a peer stopped answering without reporting an error" in n for n in waiting["notes"]), waiting
    assert waiting["next"][0] == "RuntimeError" and "MeanFieldVI cannot take step 3" in waiting["next"][1]


def test_finished_jobs_exit_zero(tmp_path):
    """Two launches (without destroy_process_group(), where it used to abort) of the repeat test in benchmarks/clean_exit.py (50 per mesh shape there, see README)."""
    out = tmp_path / "clean_exit.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "clean_exit.py"), "--launches", "1",
           "--shapes", "sample,data", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO)
    result = json.loads(out.read_text())
    failures = {k: v["failures"] for k, v in result.items() if v["failed"]}
    assert proc.returncode == 0 and not failures, failures or proc.stderr[-2000:]
    assert {k: v["launches"] for k, v in result.items()} == {"sample": 1, "data": 1}


def _evaluate(vi, which: str, x, y, num_samples: int):
    """The error of ``vi.loss`` or ``vi.predict`` as (type, message), or ``None``."""
    try:
        vi.loss(x, y) if which == "loss" else vi.predict(x, num_samples)
    except Exception as e:  # noqa: BLE001 - what the rank saw
        return type(e).__name__, str(e)
    return None


def evaluation_fails_on_rank_1(which: str):
    from pyro_sp.nn import BayesianModule, MeanFieldVI

    mesh = pyro_sp.SPMesh(sample=2)
    torch.manual_seed(0)
    vi = MeanFieldVI(BayesianModule(torch.nn.Linear(4, 3)), num_particles=4, mesh=mesh, seed=0)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    bad = x[:, :3] if mesh.rank == 1 else x  # a bad evaluation batch on one rank
    outcome = _evaluate(vi, which, bad, y, 4)
    # no abort: evaluation and training go on
    opt = torch.optim.SGD(vi.parameters(), lr=0.1)
    return outcome, float(vi.step(opt, x, y)), vi.loss(x, y), tuple(vi.predict(x, 4).shape)


@pytest.mark.parametrize("which", ["loss", "predict"])
def test_a_failing_evaluation_is_an_error_on_every_rank_and_the_job_goes_on(pools, which):
    from pyro_sp.nn import BayesianModule, MeanFieldVI

    # the error of the bad batch in one process, with a rank's share (2 of 4 particles)
    vi = MeanFieldVI(BayesianModule(torch.nn.Linear(4, 3)), num_particles=2, seed=0)
    expected = _evaluate(vi, which, torch.zeros(6, 3), torch.zeros(6, dtype=torch.long), 2)
    assert expected is not None and expected[0] == "RuntimeError"
    (own, step1, loss1, shape1), (other, step0, loss0, shape0) = pools(2).run(evaluation_fails_on_rank_1, which)[::-1]
    assert own == expected  # the failing rank: its own error
    assert other[0] == "RankError"  # the other: names it, and what failed
    assert other[1].startswith(f"MeanFieldVI.{which} failed on 1 of 2 ranks (rank 1: RuntimeError: {expected[1]})"), other
    assert step0 == step1 and loss0 == loss1 and shape0 == shape1 == (4, 6, 3)
