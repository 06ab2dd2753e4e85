# SPDX-License-Identifier: Apache-2.0
"""DistributedPredictive: Pyro's keys and shapes, right moments, uneven
shards, order of posterior samples, gather to rank 0."""

from __future__ import annotations

import re

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as tdist
from pyro.infer import Predictive

import pyro_sp

NUM_DATA = 50


def model(x):
    z = pyro.sample("z", dist.Normal(3.0, 2.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(z, 1.0))


def guide(x):
    pyro.sample("z", dist.Normal(3.0, 2.0))


def predictive_case(num_samples, axis, gather, parallel=True, posterior=False):
    mesh = pyro_sp.SPMesh(sample=tdist.get_world_size())
    x = torch.zeros(NUM_DATA)
    kwargs = dict(num_samples=num_samples, guide=guide)
    if posterior:
        kwargs = dict(posterior_samples={"z": torch.arange(float(num_samples))}, return_sites=("obs",))
    out = pyro_sp.DistributedPredictive(
        model, parallel=parallel, mesh=mesh, axis=axis, gather=gather, **kwargs
    )(x)
    return None if out is None else {k: v.clone() for k, v in out.items()}


def _pyro_shapes(num_samples):
    out = Predictive(model, guide=guide, num_samples=num_samples, parallel=True)(torch.zeros(NUM_DATA))
    return {k: tuple(v.shape) for k, v in out.items()}


@pytest.mark.parametrize("world,num_samples", [(2, 3000), (3, 3001)])
@pytest.mark.parametrize("parallel", [True, False], ids=["vectorized", "sequential"])
def test_keys_shapes_moments(pools, world, num_samples, parallel):
    if not parallel:
        num_samples //= 20
    results = pools(world).run(predictive_case, num_samples, "sample", "all", parallel)
    for r in results[1:]:
        assert r.keys() == results[0].keys()
        assert all(torch.equal(r[k], results[0][k]) for k in r)
    out = results[0]
    assert {k: tuple(v.shape) for k, v in out.items()} == _pyro_shapes(num_samples)
    z, obs = out["z"].double(), out["obs"].double()
    n = num_samples
    assert abs(z.mean() - 3.0) < 4 * 2.0 / n**0.5
    assert abs(z.std() / 2.0 - 1.0) < 4 * (0.5 / n) ** 0.5
    assert abs(obs.var(0).mean() - 5.0) < 0.5 * 5.0 * 4 * (2 / n) ** 0.5 + 0.3
    # the shards are independent draws, not copies of one stream
    half = n // world
    assert not torch.equal(z[:half], z[half : 2 * half])


def test_posterior_samples_keep_their_order(pools):
    out = pools(3).run(predictive_case, 7, "world", "all", True, True)[0]
    assert set(out) == {"obs"} and out["obs"].shape == (7, NUM_DATA)
    means = out["obs"].double().mean(-1)
    assert ((means - torch.arange(7.0)).abs() < 4 / NUM_DATA**0.5).all(), means


def gathered_both_ways():
    """The same call (same seed) gathered to every rank and to rank 0 only."""
    pyro.set_rng_seed(3)
    everywhere = predictive_case(10, "world", "all")
    pyro.set_rng_seed(3)
    return everywhere, predictive_case(10, "world", "rank0")


def test_gather_to_rank0(pools):
    results = pools(3).run(gathered_both_ways)
    assert results[1][1] is None and results[2][1] is None
    everywhere, to_rank0 = results[0]
    assert to_rank0.keys() == everywhere.keys() == {"z", "obs"}
    assert to_rank0["obs"].shape == (10, NUM_DATA)
    for k in everywhere:  # rank 0 holds what gather="all" gives every rank
        assert torch.equal(to_rank0[k], everywhere[k]), k


def test_single_process_is_pyro():
    pyro.set_rng_seed(0)
    ours = pyro_sp.DistributedPredictive(model, guide=guide, num_samples=4, parallel=True)(torch.zeros(3))
    pyro.set_rng_seed(0)
    theirs = Predictive(model, guide=guide, num_samples=4, parallel=True)(torch.zeros(3))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_argument_errors():
    with pytest.raises(ValueError, match=re.escape("Expected axis in ('sample', 'world'), got 'data'.")):
        pyro_sp.DistributedPredictive(model, num_samples=3, axis="data")
    with pytest.raises(ValueError, match=re.escape("Expected gather in ('all', 'rank0'), got 'rank1'.")):
        pyro_sp.DistributedPredictive(model, num_samples=3, gather="rank1")
    with pytest.raises(ValueError, match=re.escape("Either posterior_samples or num_samples must be specified.")):
        pyro_sp.DistributedPredictive(model)


def _model_failing_on_rank_1(x):
    if tdist.get_rank() == 1:
        raise ValueError("bad inputs on rank 1")
    model(x)


def failing_predictive():
    mesh = pyro_sp.SPMesh(sample=tdist.get_world_size())
    pyro_sp.DistributedPredictive(_model_failing_on_rank_1, num_samples=4, mesh=mesh)(torch.zeros(3))


def test_failure_on_one_rank_is_an_error_everywhere(pools):
    errors = pools(2).run_expecting_errors(failing_predictive)
    kind, msg, _ = errors[1]
    assert (kind, msg.splitlines()[0]) == ("ValueError", "bad inputs on rank 1")  # then Pyro's trace shapes
    assert errors[0][0] == "RankError"
    assert errors[0][1].startswith(f"DistributedPredictive failed on 1 of 2 ranks (rank 1: ValueError: {msg})."), errors[0][1]


def reseeded_predictive():
    mesh = pyro_sp.SPMesh(sample=tdist.get_world_size())
    predictive = pyro_sp.DistributedPredictive(model, guide=guide, num_samples=5, parallel=True, mesh=mesh)
    pyro.set_rng_seed(4)
    first = predictive(torch.zeros(3))["obs"]
    second = predictive(torch.zeros(3))["obs"]
    pyro.set_rng_seed(4)
    again = pyro_sp.DistributedPredictive(model, guide=guide, num_samples=5, parallel=True, mesh=mesh)(torch.zeros(3))["obs"]
    return torch.equal(first, again), torch.equal(first, second)


def test_set_rng_seed_reproduces_predictions(pools):
    assert pools(2).run(reseeded_predictive) == [(True, False)] * 2


def mismatched_inputs():
    mesh = pyro_sp.SPMesh(sample=tdist.get_world_size())
    pyro_sp.DistributedPredictive(model, num_samples=4, mesh=mesh)(torch.full((3,), float(tdist.get_rank())))


#: the first line and the fix of a disagreement of a sample group's inputs
DISAGREEMENT = (
    "Expected the ranks of each sample group to call DistributedPredictive with the same data and the "
    "same random state (they split the particles of one estimate), but they differ:"
)
FIX = "Give every rank of a sample group the same arguments"


def _disagreements(msg: str) -> list[str]:
    """The lines naming what differs; the message must start and end as every disagreement does."""
    lines = msg.splitlines()
    assert lines[0] == DISAGREEMENT and lines[-1].startswith(FIX), msg
    return lines[1:-1]


def test_inputs_must_agree(pools):
    # x = torch.full((3,), rank): zeros hash to 0, ones to another value
    for kind, msg, _ in pools(2).run_expecting_errors(mismatched_inputs).values():
        assert kind == "ValueError"
        (line,) = _disagreements(msg)
        assert line.startswith("  data group 0: args[0]: rank 0 has ((3,), 'torch.float64', 0), rank 1 has ((3,), 'torch.float64', ")
        assert not line.endswith(", 0)"), line


def per_group_inputs(sample: int, data: int, same_in_group: bool = True):
    mesh = pyro_sp.SPMesh(sample=sample, data=data)
    # each data group predicts for its own inputs; the ranks of a sample group share them
    n = 3 + mesh.data_index
    x = torch.zeros(n) if same_in_group else torch.full((n,), float(mesh.sample_index))
    pyro.set_rng_seed(2)
    out = pyro_sp.DistributedPredictive(model, guide=guide, num_samples=6, parallel=True, mesh=mesh)(x)
    return mesh.data_index, tuple(out["obs"].shape), out["z"].clone()


@pytest.mark.parametrize("sample,data", [(1, 2), (2, 2)], ids=["data2", "hybrid2x2"])
def test_each_data_group_predicts_for_its_own_inputs(pools, sample, data):
    results = pools(sample * data).run(per_group_inputs, sample, data)
    for d, shape, z in results:
        assert shape == (6, 3 + d)
    by_group = {}
    for d, _, z in results:  # the ranks of one sample group hold one gathered result
        assert torch.equal(by_group.setdefault(d, z), z)


def test_a_sample_group_must_share_its_inputs_on_a_hybrid_mesh(pools):
    errors = pools(4).run_expecting_errors(per_group_inputs, 2, 2, False)
    for rank, (kind, msg, _) in errors.items():
        assert kind == "ValueError", (rank, msg)
        # each sample group finds its own disagreement: the inputs of 3 + data_index points
        (line,) = _disagreements(msg)
        group = rank // 2  # named by its data group and the global ranks of its members
        assert line.startswith(f"  data group {group}: args[0]: rank {2 * group} has (({3 + group},), 'torch.float64', 0), "
                               f"rank {2 * group + 1} has "), (rank, line)


def test_a_hybrid_disagreement_names_its_data_group_and_global_ranks(pools):
    errors = pools(4).run_expecting_errors(per_group_inputs, 2, 2, False)
    for rank in (2, 3):
        (line,) = _disagreements(errors[rank][1])
        assert line.startswith("  data group 1: args[0]: rank 2 has ((4,), 'torch.float64', 0), rank 3 has "), line
