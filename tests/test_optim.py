# SPDX-License-Identifier: Apache-2.0
"""pyro_sp.optim: one torch optimizer for all parameters gives each parameter exactly
the update of Pyro's per-parameter wrapper (bit for bit), steps only the parameters
of the call, and reads and writes Pyro's optimizer state format."""

from __future__ import annotations

import copy

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import pyro_sp
import pyro_sp.optim


def _data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.1 * torch.randn(40, generator=g, dtype=torch.float64)
    return x, y


def model(x, y, extra=False):
    w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=x.dtype), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
    mean = (x * w).sum(-1) + b  # broadcasts over a particle dimension
    if extra:  # a site (and guide parameters) present in some steps only
        mean = mean + pyro.sample("c", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(mean, 0.3), obs=y)


def guide(x, y, extra=False):
    for name, shape in (("w", (3,)), ("b", ())) + ((("c", ()),) if extra else ()):
        loc = pyro.param(f"{name}_loc", torch.zeros(shape, dtype=x.dtype))
        scale = pyro.param(f"{name}_scale", torch.full(shape, 0.5, dtype=x.dtype),
                           constraint=dist.constraints.positive)
        d = dist.Normal(loc, scale)
        pyro.sample(name, d.to_event(1) if shape else d)


def _train(optim, steps=12, pattern=(False, True, False)):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x, y = _data()
    svi = SVI(model, guide, optim, loss=Trace_ELBO())
    losses = [svi.step(x, y, pattern[i % len(pattern)]) for i in range(steps)]
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    return losses, params, optim


def _per_param_args(name):
    return {"lr": 0.05 if "scale" in name else 0.02, "betas": (0.8, 0.99)}


@pytest.mark.parametrize("pyro_optim, ours", [
    (lambda: pyro.optim.Adam({"lr": 0.03}), lambda: pyro_sp.optim.Adam({"lr": 0.03})),
    (lambda: pyro.optim.Adam(_per_param_args), lambda: pyro_sp.optim.Adam(_per_param_args)),
    (lambda: pyro.optim.Adam({"lr": 0.03}, {"clip_norm": 0.5}), lambda: pyro_sp.optim.Adam({"lr": 0.03}, {"clip_norm": 0.5})),
    (lambda: pyro.optim.AdamW({"lr": 0.03, "weight_decay": 0.1}), lambda: pyro_sp.optim.AdamW({"lr": 0.03, "weight_decay": 0.1})),
    (lambda: pyro.optim.SGD({"lr": 0.001, "momentum": 0.9}), lambda: pyro_sp.optim.SGD({"lr": 0.001, "momentum": 0.9})),
], ids=["adam", "per-param-args", "clip", "adamw", "sgd"])
def test_same_updates_as_pyro(pyro_optim, ours):
    # A parameter absent from some steps (site "c") must neither move nor age its state
    # there: with zero gradients left by SVI, a shared step would move it by momentum.
    expected_losses, expected, _ = _train(pyro_optim())
    losses, params, optim = _train(ours())
    assert losses == expected_losses
    assert params.keys() == expected.keys()
    for name in expected:
        assert torch.equal(params[name], expected[name]), name
    assert len(optim.torch_optimizer.param_groups) >= 1


def test_one_step_for_all_parameters():
    _, _, optim = _train(pyro_sp.optim.Adam({"lr": 0.03}), steps=3, pattern=(True,))
    calls = []
    optim.torch_optimizer.register_step_post_hook(lambda *a: calls.append(1))
    x, y = _data()
    SVI(model, guide, optim, loss=Trace_ELBO()).step(x, y, True)
    assert len(calls) == 1  # one step() for the six parameters (Pyro's wrapper: six)
    assert sum(len(g["params"]) for g in optim.torch_optimizer.param_groups) == 6


def test_state_round_trips_with_pyro():
    # our state in Pyro's format loads into pyro.optim.Adam and the two continue identically
    _, _, ours = _train(pyro_sp.optim.Adam({"lr": 0.03}), steps=5, pattern=(True,))
    state = ours.get_state()
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    x, y = _data()

    def resume(optim):
        pyro.clear_param_store()
        for k, v in params.items():
            pyro.param(k, v.clone(), constraint=dist.constraints.positive if "scale" in k else dist.constraints.real)
        optim.set_state(copy.deepcopy(state))  # a loaded state is updated in place
        pyro.set_rng_seed(1)
        svi = SVI(model, guide, optim, loss=Trace_ELBO())
        for _ in range(4):
            svi.step(x, y, True)
        return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}, optim.get_state()

    theirs_params, theirs_state = resume(pyro.optim.Adam({"lr": 0.03}))
    ours_params, ours_state = resume(pyro_sp.optim.Adam({"lr": 0.03}))
    for k in theirs_params:
        assert torch.equal(ours_params[k], theirs_params[k]), k
    assert theirs_state.keys() == ours_state.keys()
    for k in theirs_state:
        a, b = theirs_state[k], ours_state[k]
        assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"]
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["state"][0][field], b["state"][0][field]), (k, field)


def test_with_compiled_estimator_and_autoguide():
    x, y = _data()

    def run(optim):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        g = AutoNormal(model)
        elbo = pyro_sp.DistributedTrace_ELBO(num_particles=4, vectorize_particles=True, compile="graph")
        svi = SVI(model, g, optim, loss=elbo)
        losses = [svi.step(x, y) for _ in range(6)]
        return losses, {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    expected_losses, expected = run(pyro.optim.Adam({"lr": 0.03}))
    losses, params = run(pyro_sp.optim.Adam({"lr": 0.03}))
    assert losses == expected_losses
    for k in expected:
        assert torch.equal(params[k], expected[k]), k


def test_refuses_a_non_elementwise_optimizer():
    with pytest.raises(TypeError, match=r"Expected an elementwise torch optimizer class .*got .*ClippedAdam.*"
                                        r"pyro.optim.PyroOptim"):
        pyro_sp.optim.GroupedOptim(pyro.optim.clipped_adam.ClippedAdam, {"lr": 0.1})
    with pytest.raises(TypeError, match="Expected an elementwise torch optimizer class"):
        pyro_sp.optim.GroupedOptim(torch.optim.LBFGS, {"lr": 0.1})


def test_not_taken_for_a_scheduler():
    # Pyro tells a learning-rate scheduler by an `optimizer` attribute
    from pyro.optim.optim import is_scheduler

    _, _, optim = _train(pyro_sp.optim.Adam({"lr": 0.03}), steps=1)
    assert not is_scheduler(optim)
