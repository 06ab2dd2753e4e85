# SPDX-License-Identifier: Apache-2.0
"""The shared distributed core: the guard, the stream table, the recorder's
accounting of every collective, and both gradient strategies on any path."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from pyro.infer.autoguide import AutoNormal

import pyro_sp
from pyro_sp.distributed import (
    STREAMS,
    BucketedSum,
    all_reduce_gradients,
    guarded,
    record_collectives,
    stream_seed,
)
from pyro_sp.distributed.streams import derive_seed
from pyro_sp.nn import BayesianModule, MeanFieldVI


def test_guarded_without_a_group_is_the_plain_call():
    assert guarded(lambda: 3.5, group=None, what="x", value=lambda v: v) == (3.5, 3.5)
    with pytest.raises(ZeroDivisionError):
        guarded(lambda: 1 / 0, group=None, what="x")


def guard_case():
    rank = torch.distributed.get_rank()
    out = {}
    # the values are summed, the result is this rank's own
    out["sum"] = guarded(lambda: rank + 1.0, group=torch.distributed.group.WORLD, what="sum", value=lambda v: v)
    # one rank fails: it raises its own error, the others a RankError naming it
    try:
        guarded(lambda: {}[f"key on rank {rank}"] if rank == 1 else 0.0, group=torch.distributed.group.WORLD,
                what="the lookup")
    except Exception as e:  # noqa: BLE001 - the test looks at it
        out["failure"] = (type(e).__name__, str(e))
    # layouts differ: a ValueError on every rank naming the key and both values
    try:
        guarded(lambda: None, group=torch.distributed.group.WORLD, what="the layout",
                layout=lambda _: {"num_particles": 4 + rank})
    except ValueError as e:
        out["layout"] = str(e)
    return out


def test_guarded_raises_the_same_failure_everywhere(pools):
    r0, r1 = pools(2).run(guard_case)
    assert r0["sum"] == (1.0, 3.0) and r1["sum"] == (2.0, 3.0)
    assert r1["failure"] == ("KeyError", "'key on rank 1'")
    assert r0["failure"][0] == "RankError"
    assert "the lookup failed on 1 of 2 ranks (rank 1: KeyError: 'key on rank 1')" in r0["failure"][1]
    for r in (r0, r1):
        assert "num_particles: rank 0 has 4, rank 1 has 5" in r["layout"]


def test_every_stream_is_in_the_table():
    assert stream_seed(7, "particles", 1) == derive_seed(7, "particles", 1)
    assert len({stream_seed(7, name, 0) for name in STREAMS}) == len(STREAMS)  # no two streams share a seed
    with pytest.raises(ValueError, match="Expected a stream in .*got 'dropout'; define it in STREAMS first"):
        stream_seed(7, "dropout")


def _svi_step(mesh):
    def model(x):
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal((x * w.unsqueeze(-2)).sum(-1), 1.0), obs=x.sum(-1))

    elbo = pyro_sp.DistributedRenyiELBO(alpha=0.5, num_particles=4, vectorize_particles=True, mesh=mesh,
                                        max_plate_nesting=1)
    svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.01}), loss=elbo)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(mesh.data_index))
    return lambda: svi.step(x)


def accounting_case():
    mesh = pyro_sp.SPMesh(sample=1, data=2)
    step = _svi_step(mesh)
    step()  # parameters appear and are broadcast
    with record_collectives() as estimator:
        step()
    with record_collectives() as fused:
        vi = MeanFieldVI(BayesianModule(torch.nn.Linear(2, 3)), num_particles=2, mesh=mesh)
        opt = torch.optim.SGD(vi.parameters(), lr=0.1)
        x, y = torch.randn(4, 2), torch.randint(0, 3, (4,))
        for _ in range(2):  # the first step is checked, the second's loss is summed asynchronously
            vi.step(opt, x, y)
    return sorted({e[0] for e in estimator.events}), sorted({e[0] for e in fused.events})


def test_the_recorder_sees_every_collective(pools):
    estimator, fused = pools(2).run(accounting_case)[0]
    # a nonlinear estimator on a data axis: the check, the log-weights' mean over data groups, the gradients
    assert estimator == ["all_reduce_gradients", "data_mean", "step_check"]
    # MeanFieldVI: the shared seed, the construction's check and broadcast, the first step's checks,
    # the bucketed gradients while backward runs, the later step's loss sum
    assert fused == ["broadcast", "bucketed_gradients", "loss_sum", "shared_seed", "step_check"]


def strategies_case():
    """Both gradient strategies on one module's gradients give the same sum."""
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3) * (rank + 1)
    group = torch.distributed.group.WORLD
    module(x).square().sum().backward()
    flat = [g.clone() for g in all_reduce_gradients(list(module.parameters()),
                                                    [p.grad for p in module.parameters()], group=group)]
    module.zero_grad()
    wrapped = BucketedSum(module, group=group).module
    wrapped(x).square().sum().backward()
    bucketed = [p.grad.clone() for p in module.parameters()]
    return flat, bucketed, [p.detach().clone() for p in module.parameters()], x


def test_both_gradient_strategies_sum_the_same(pools):
    (flat0, bucketed0, params, x0), (flat1, bucketed1, _, x1) = pools(2).run(strategies_case)
    module = torch.nn.Linear(3, 2).to(params[0].dtype)
    with torch.no_grad():
        for p, v in zip(module.parameters(), params):
            p.copy_(v)
    (module(x0).square().sum() + module(x1).square().sum()).backward()  # the single-process sum
    for got in (flat0, bucketed0, flat1, bucketed1):
        for g, ref in zip(got, [p.grad for p in module.parameters()]):
            assert torch.allclose(g, ref, rtol=1e-12, atol=1e-12)
