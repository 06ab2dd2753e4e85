# SPDX-License-Identifier: Apache-2.0
"""Every misuse is a clear error on every rank, never a hang; the ranks stay
usable afterwards."""

from __future__ import annotations

import re

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as tdist

import pyro_sp
from tests.models import make_data, make_guide, model, param_guide


def _loss(elbo, guide=param_guide, model_fn=model):
    x, y = make_data(0)
    return elbo.loss_and_grads(model_fn, guide, x, y)


#: the fix every layout disagreement ends with
LAYOUT_FIX = "Make num_particles, the mesh and the model/guide structure the same on every rank."


def disagreeing_num_particles():
    rank = tdist.get_rank()
    _loss(pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=8 + rank, mesh=pyro_sp.SPMesh(sample=2)))


def _guide_with_extra_param(x, y):
    param_guide(x, y)
    if tdist.get_rank() == 1:
        pyro.param("extra", torch.zeros(2))


def disagreeing_param_names():
    _loss(pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=4, mesh=pyro_sp.SPMesh(sample=2)), _guide_with_extra_param)


def _guide_with_other_shape(x, y):
    param_guide(x, y)
    pyro.param("extra", torch.zeros(2 + tdist.get_rank()))


def disagreeing_param_shapes():
    _loss(pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=4, mesh=pyro_sp.SPMesh(sample=2)), _guide_with_other_shape)


def indivisible_mesh():
    pyro_sp.SPMesh(sample=2)


def indivisible_init_mesh():
    pyro_sp.init_mesh(sample=2)


def _unvectorizable_model(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = pyro.sample("sigma", dist.LogNormal(-1.0, 0.5))
    mean = torch.mv(x, w) + b  # fails once w has a particle dimension
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


def unvectorizable_model():
    _loss(
        pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=4, mesh=pyro_sp.SPMesh(sample=2)),
        param_guide,
        _unvectorizable_model,
    )


def _model_failing_on_rank_1(x, y):
    if tdist.get_rank() == 1:
        raise KeyError("only rank 1 lacks this")
    model(x, y)


def failure_on_one_rank():
    _loss(
        pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=4, mesh=pyro_sp.SPMesh(sample=2)),
        param_guide,
        _model_failing_on_rank_1,
    )


def failure_keeps_earlier_gradients():
    x, y = make_data(0)
    elbo = pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=4, mesh=pyro_sp.SPMesh(sample=2))
    elbo.loss_and_grads(model, param_guide, x, y)
    earlier = {n: p.grad.clone() for n, p in pyro.get_param_store().named_parameters()}
    try:
        elbo.loss_and_grads(_model_failing_on_rank_1, param_guide, x, y)
    except KeyError as e:  # rank 1: its own error
        assert "only rank 1 lacks this" in str(e)
    except pyro_sp.RankError as e:  # rank 0: names it
        assert "rank 1: KeyError" in str(e)
    else:
        raise AssertionError("expected an error")
    return all(torch.equal(p.grad, earlier[n]) for n, p in pyro.get_param_store().named_parameters())


def test_failure_keeps_earlier_gradients(pools):
    assert pools(2).run(failure_keeps_earlier_gradients) == [True, True]


def jit_random_subsample():
    x, y = make_data(0)
    elbo = pyro_sp.DistributedJitTrace_ELBO(vectorize_particles=True, num_particles=4, mesh=pyro_sp.SPMesh(sample=2))
    elbo.loss_and_grads(model, param_guide, x, y, subsample_size=6)


def test_jit_refuses_random_subsampling_under_a_sample_axis(pools):
    for kind, msg, _ in _errors(pools(2), jit_random_subsample).values():
        assert kind == "ValueError", msg
        assert "Random subsampling of plate 'data' cannot be shared across the sample axis inside a JIT-compiled ELBO" in msg
        assert "Pass subsample= indices to the plate, or use the non-JIT estimator." in msg


def healthy():
    world = tdist.get_world_size()
    _loss(pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=4, mesh=pyro_sp.SPMesh(sample=world)))
    return tdist.get_rank()


def _errors(pool, fn):
    errors = pool.run_expecting_errors(fn)
    assert pool.run(healthy) == list(range(pool.world)), "ranks not usable after the error"
    return errors


INDIVISIBLE = {
    # what was expected, what was received (every degree, the world size), and the fix
    indivisible_mesh: "Expected sample * data == world size, got sample=2, data=1 (product 2) on world "
    "size 3. Choose degrees whose product is the number of ranks.",
    indivisible_init_mesh: "Expected sample to be a positive divisor of the world size 3, got sample=2, "
    "data=None. Launch a multiple of 2 ranks or change sample.",
}


def test_indivisible_sample_axis(pools):
    for fn, expected in INDIVISIBLE.items():
        for rank, (kind, msg, _) in pools(3).run_expecting_errors(fn).items():
            assert (kind, msg) == ("ValueError", expected), (rank, fn.__name__)


def test_disagreeing_num_particles(pools):
    for kind, msg, _ in _errors(pools(2), disagreeing_num_particles).values():
        assert kind == "ValueError"
        assert "num_particles: rank 0 has 8, rank 1 has 9" in msg
        assert msg.endswith(LAYOUT_FIX), msg


def test_disagreeing_param_names(pools):
    for kind, msg, _ in _errors(pools(2), disagreeing_param_names).values():
        assert kind == "ValueError"
        assert "only on rank 1: ['extra']" in msg
        assert msg.endswith(LAYOUT_FIX), msg


def test_disagreeing_param_shapes(pools):
    for kind, msg, _ in _errors(pools(2), disagreeing_param_shapes).values():
        assert kind == "ValueError"
        assert "params['extra']: rank 0 has (2,), rank 1 has (3,)" in msg
        assert msg.endswith(LAYOUT_FIX), msg


def _pyro_error(model_fn, guide, *args) -> tuple[str, str]:
    """Type and first message line of the error Pyro's own estimator raises on ``model_fn``."""
    try:
        pyro.infer.Trace_ELBO(num_particles=4, vectorize_particles=True).loss(model_fn, guide, *args)
    except Exception as e:  # noqa: BLE001 - the reference error
        return type(e).__name__, str(e).splitlines()[0]
    raise AssertionError("Pyro's estimator raised no error")


def test_unvectorizable_model(pools):
    expected = _pyro_error(_unvectorizable_model, param_guide, *make_data(0))
    for kind, msg, tb in _errors(pools(2), unvectorizable_model).values():
        # torch's own error, re-raised on each rank: what Pyro's estimator raises
        assert (kind, msg.splitlines()[0]) == expected
        assert "particle dimension" in tb and "also failed on rank" in tb  # the notes


def test_failure_on_one_rank_stops_every_rank(pools):
    errors = _errors(pools(2), failure_on_one_rank)
    kind, msg, tb = errors[1]
    assert kind == "KeyError" and msg == "'only rank 1 lacks this'"
    rank0_kind, rank0_msg, _ = errors[0]
    assert rank0_kind == "RankError"
    assert rank0_msg.startswith(
        "DistributedTrace_ELBO.loss_and_grads failed on 1 of 2 ranks (rank 1: KeyError: 'only rank 1 lacks this'). "
        "This rank completed its part but stops too; the original exception is raised on rank 1."
    ), rank0_msg
    assert "test_errors.py" in tb and "_model_failing_on_rank_1" in tb  # its own traceback


def test_errors_without_process_group():
    with pytest.raises(ValueError, match=re.escape("Expected an integer num_particles >= 1, got 0.")):
        pyro_sp.DistributedTrace_ELBO(num_particles=0)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Expected sample * data == world size, got sample=2, data=1 (product 2) on world size 1. "
            "Choose degrees whose product is the number of ranks."
        ),
    ):
        pyro_sp.SPMesh(sample=2)
    with pytest.raises(
        ValueError, match=re.escape("Expected positive integer mesh degrees, got sample=0, data=1 (sample is invalid).")
    ):
        pyro_sp.SPMesh(sample=0)
    guide = make_guide("normal", model)
    x, y = make_data(0)
    kind, first_line = _pyro_error(_unvectorizable_model, guide, x, y)
    assert kind == "RuntimeError"
    with pytest.raises(RuntimeError, match=re.escape(first_line)):  # Pyro's own error, untouched
        pyro_sp.DistributedTrace_ELBO(num_particles=3, vectorize_particles=True).loss(
            _unvectorizable_model, guide, x, y
        )
