# SPDX-License-Identifier: Apache-2.0
"""Every sharded estimator equals the single-process Pyro estimator it
replaces, with pinned particle noise, in float64, on every interface:
TraceGraph (with a non-reparameterizable site and decaying-average
baselines), TraceEnum (enumerated mixture), TMC, Renyi (alpha 0 and 0.5),
tail-adaptive (Pyro's ranks), and sequential (non-vectorized) particles."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import (
    JitTraceEnum_ELBO,
    JitTraceGraph_ELBO,
    JitTraceMeanField_ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceTailAdaptive_ELBO,
    TraceTMC_ELBO,
)
from pyro.ops.indexing import Vindex

import pyro_sp
from pyro_sp.infer.tracegraph_elbo import BASELINE_PREFIX
from tests.common import assert_close, particle_seed, pinned_noise, pinned_sequential_noise
from tests.models import make_data, model, param_guide

B = 12  # data points


def _x(data_index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(40 + data_index)
    x = torch.randn(B, generator=g, dtype=torch.float64, device="cpu") + 1.0
    return x.to(dtype=torch.get_default_dtype(), device=torch.get_default_device())


# ---- models -----------------------------------------------------------------------
def tg_model(x):
    c = pyro.sample("c", dist.Bernoulli(0.3))
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(z + c, 1.0), obs=x)


def tg_guide(x):
    p = pyro.param("p", torch.tensor(0.4), constraint=constraints.unit_interval)
    baseline = {"use_decaying_avg_baseline": True, "baseline_beta": 0.8}
    pyro.sample("c", dist.Bernoulli(p), infer={"baseline": baseline})
    m = pyro.param("m", torch.tensor(0.1))
    pyro.sample("z", dist.Normal(m, 0.7))


def tg_guide_without_baseline(x):
    """Pyro's JitTraceGraph_ELBO cannot compile decaying-average baselines (in one process too)."""
    p = pyro.param("p", torch.tensor(0.4), constraint=constraints.unit_interval)
    pyro.sample("c", dist.Bernoulli(p))
    m = pyro.param("m", torch.tensor(0.1))
    pyro.sample("z", dist.Normal(m, 0.7))


def mixture_model(x):
    locs = pyro.sample("locs", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        a = pyro.sample("a", dist.Categorical(torch.tensor([0.4, 0.6])), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(Vindex(locs)[..., a], 1.0), obs=x)


def mixture_guide(x):
    loc = pyro.param("loc", torch.tensor([-0.5, 1.5]))
    pyro.sample("locs", dist.Normal(loc, 0.5).to_event(1))


def tmc_model(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def tmc_guide(x):
    m = pyro.param("m", torch.tensor(0.2))
    pyro.sample("z", dist.Normal(m, 0.8), infer={"enumerate": "parallel", "num_samples": 3, "expand": False})


def local_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def local_guide(x):
    m = pyro.param("m", torch.linspace(-0.5, 0.5, x.shape[0]))
    s = pyro.param("s", torch.full((x.shape[0],), 0.7), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(m, s))


def edge_model(x, y):
    """poutine.scale, poutine.mask, obs_mask and pyro.factor, as Pyro accepts them."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
    with pyro.poutine.scale(scale=0.5):
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
    pyro.factor("penalty", -0.1 * w.pow(2).sum(-1))
    n = x.shape[0]
    observed = torch.arange(n) % 4 != 0
    with pyro.plate("data", n):
        mean = (x * w).sum(-1) + b
        with pyro.poutine.mask(mask=torch.arange(n) % 5 != 1):
            pyro.sample("obs", dist.Normal(mean, 0.5), obs=y, obs_mask=observed)


def edge_guide(x, y):
    w_loc = pyro.param("w_loc", torch.tensor([0.3, -0.2, 0.1]))
    pyro.sample("w", dist.Normal(w_loc, 0.4).to_event(1))
    b_loc = pyro.param("b_loc", torch.tensor(0.2))
    with pyro.poutine.scale(scale=0.5):
        pyro.sample("b", dist.Normal(b_loc, 0.3))
    pyro.factor("q_penalty", -0.05 * w_loc.pow(2).sum(), has_rsample=True)
    n = x.shape[0]
    loc = pyro.param("missing_loc", torch.zeros(n))
    with pyro.plate("data", n), pyro.poutine.mask(mask=torch.arange(n) % 4 == 0):
        pyro.sample("obs_unobserved", dist.Normal(loc, 1.0))


# ---- cases --------------------------------------------------------------------------
@dataclass
class Case:
    dist_cls: type
    pyro_cls: type
    model: object
    guide: object
    inputs: object  # data_index -> (args, kwargs)
    kwargs: dict = field(default_factory=dict)
    interfaces: tuple = ("loss_and_grads", "loss", "differentiable_loss")
    noise: str = "vectorized"  # or "sequential"
    noise_dim: int = 0
    calls: int = 1


def _x_inputs(d):
    return (_x(d),), {}


def _regression_inputs(d):
    x, y = make_data(10 + d)
    return (x, y), {}


CASES = {
    "tracegraph": Case(pyro_sp.DistributedTraceGraph_ELBO, TraceGraph_ELBO, tg_model, tg_guide, _x_inputs, calls=2),
    "jit_tracegraph": Case(
        pyro_sp.DistributedJitTraceGraph_ELBO, JitTraceGraph_ELBO, tg_model, tg_guide_without_baseline, _x_inputs,
        calls=2,
    ),
    "traceenum": Case(
        pyro_sp.DistributedTraceEnum_ELBO, TraceEnum_ELBO, mixture_model, mixture_guide, _x_inputs,
        kwargs={"max_plate_nesting": 1},
    ),
    "jit_traceenum": Case(
        pyro_sp.DistributedJitTraceEnum_ELBO, JitTraceEnum_ELBO, mixture_model, mixture_guide, _x_inputs,
        kwargs={"max_plate_nesting": 1}, interfaces=("loss_and_grads", "differentiable_loss"),
    ),
    "tmc": Case(
        pyro_sp.DistributedTraceTMC_ELBO, TraceTMC_ELBO, tmc_model, tmc_guide, _x_inputs,
        kwargs={"max_plate_nesting": 1}, noise_dim=1,
    ),
    "jit_meanfield": Case(
        pyro_sp.DistributedJitTraceMeanField_ELBO, JitTraceMeanField_ELBO, local_model, local_guide, _x_inputs,
    ),
    "renyi0": Case(
        pyro_sp.DistributedRenyiELBO, RenyiELBO, model, param_guide, _regression_inputs,
        kwargs={"alpha": 0.0}, interfaces=("loss_and_grads", "loss"),
    ),
    "renyi05_local": Case(
        pyro_sp.DistributedRenyiELBO, RenyiELBO, local_model, local_guide, _x_inputs,
        kwargs={"alpha": 0.5}, interfaces=("loss_and_grads", "loss"),
    ),
    "tail_pyro": Case(
        pyro_sp.DistributedTraceTailAdaptive_ELBO, TraceTailAdaptive_ELBO, local_model, local_guide, _x_inputs,
        kwargs={"tail_adaptive_beta": -0.5}, interfaces=("loss_and_grads", "differentiable_loss"),
    ),
    "edges": Case(pyro_sp.DistributedTrace_ELBO, Trace_ELBO, edge_model, edge_guide, _regression_inputs),
    "trace_sequential": Case(
        pyro_sp.DistributedTrace_ELBO, Trace_ELBO, model, param_guide, _regression_inputs,
        kwargs={"vectorize_particles": False}, noise="sequential",
    ),
    "renyi_sequential": Case(
        pyro_sp.DistributedRenyiELBO, RenyiELBO, model, param_guide, _regression_inputs,
        kwargs={"alpha": 0.0, "vectorize_particles": False}, noise="sequential",
        interfaces=("loss_and_grads", "loss"),
    ),
}


def _noise(case: Case, elbo, num_particles, lo, hi, seed):
    if case.noise == "sequential":
        return pinned_sequential_noise(elbo, lo, seed)
    stack = contextlib.ExitStack()
    if num_particles > 1:  # one particle has no particle plate: its stream alone pins it
        stack.enter_context(pinned_noise(num_particles, lo, hi, dim=case.noise_dim))
    stack.enter_context(particle_seed(elbo, seed))
    return stack


def _params():
    store = pyro.get_param_store()
    return {n: store[n].unconstrained() for n in store.keys() if not n.startswith(BASELINE_PREFIX)}


def _clear_baselines():
    store = pyro.get_param_store()
    for name in [n for n in store.keys() if n.startswith(BASELINE_PREFIX)]:
        del store[name]


def _run(case: Case, elbo, num_particles, lo, hi, d, args, kwargs, interfaces):
    """The interfaces' losses and gradients after ``case.calls`` calls of each."""
    out = {}
    for iface in interfaces:
        _clear_baselines()
        for call in range(case.calls):
            for p in _params().values():
                p.grad = None
            with _noise(case, elbo, num_particles, lo, hi, seed=1000 * d + call):
                value = getattr(elbo, iface)(case.model, case.guide, *args, **kwargs)
                if iface == "differentiable_loss":
                    value.backward()
                    value = value.item()
        grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in _params().items()}
        out[iface] = (value, grads)
    return out


def estimator_case(name: str, sample: int, data: int, num_particles: int):
    case = CASES[name]
    mesh = pyro_sp.SPMesh(sample=sample, data=data)
    d = mesh.data_index
    args, kwargs = case.inputs(d)
    elbo = case.dist_cls(num_particles=num_particles, mesh=mesh, **{"vectorize_particles": True, **case.kwargs})
    lo, hi = mesh.particle_share(num_particles)
    if lo == hi:  # fewer particles than ranks: this rank evaluates one stand-in particle
        lo = min(lo, num_particles - 1)
        hi = lo + 1
    # create and broadcast the parameters without compiling the JIT estimators (their
    # ``loss`` is not compiled); tail-adaptive has no ``loss``
    setup = elbo.loss_and_grads if case.dist_cls is pyro_sp.DistributedTraceTailAdaptive_ELBO else elbo.loss
    setup(case.model, case.guide, *args, **kwargs)
    with _noise(case, elbo, num_particles, lo, hi, seed=99):  # JIT: compile with pinned noise
        elbo.loss_and_grads(case.model, case.guide, *args, **kwargs)
    _clear_baselines()
    state = pyro.get_param_store().get_state()
    mine = _run(case, elbo, num_particles, lo, hi, d, args, kwargs, case.interfaces)

    ref_ifaces = tuple(i for i in case.interfaces if hasattr(case.pyro_cls, i))
    reference = {}
    vectorized = case.kwargs.get("vectorize_particles", True)
    for dd in range(data):
        pyro.clear_param_store()
        pyro.get_param_store().set_state(
            {
                "params": {n: v.detach().clone().requires_grad_() for n, v in state["params"].items()},
                "constraints": dict(state["constraints"]),
            }
        )
        ref_kwargs = dict(case.kwargs, num_particles=num_particles, vectorize_particles=vectorized)
        if vectorized and "max_plate_nesting" not in case.kwargs:
            ref_kwargs["max_plate_nesting"] = elbo.max_plate_nesting - (num_particles > 1)
        ref = case.pyro_cls(**ref_kwargs)
        ref_args, ref_kwargs_ = case.inputs(dd)
        with _noise(case, ref, num_particles, 0, num_particles, seed=99):
            ref.loss_and_grads(case.model, case.guide, *ref_args, **ref_kwargs_)
        for iface, (value, grads) in _run(case, ref, num_particles, 0, num_particles, dd, ref_args, ref_kwargs_, ref_ifaces).items():
            acc = reference.setdefault(iface, [0.0, {}])
            acc[0] += value / data
            for n, g in grads.items():
                acc[1][n] = None if g is None else acc[1].get(n, 0.0) + g / data
    return mine, reference


WORLDS = [
    pytest.param(1, 1, 5, id="w1"),
    pytest.param(2, 1, 7, id="w2-uneven"),
    pytest.param(3, 1, 7, id="w3-uneven"),
    pytest.param(2, 2, 5, id="hybrid2x2"),
    pytest.param(3, 1, 2, id="w3-fewer-particles"),
    pytest.param(2, 1, 1, id="w2-one-particle"),
]


@pytest.mark.parametrize("sample,data,num_particles", WORLDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_estimator_exact(pools, name, sample, data, num_particles):
    if num_particles == 1 and name.startswith("tail"):
        pytest.skip("Pyro warns that one particle makes tail-adaptive Trace_ELBO")
    results = pools(sample * data).run(estimator_case, name, sample, data, num_particles)
    reference = results[0][1]
    grad_ref = reference["loss_and_grads"][1]
    assert any(g is not None for g in grad_ref.values()), "no gradients to compare"
    for rank, (mine, _) in enumerate(results):
        for iface, (value, grads) in mine.items():
            # the value: Pyro's same interface (or its loss where Pyro has none); the
            # gradient: always that of Pyro's loss_and_grads, the estimator's gradient
            ref_value = reference[iface if iface in reference else "loss"][0]
            ref_grads = reference["loss_and_grads"][1]
            assert_close(value, ref_value, msg=f"rank {rank} {iface} loss")
            if iface == "loss":
                continue
            assert set(grads) == set(ref_grads)
            for n, g in grads.items():
                assert (g is None) == (ref_grads[n] is None), (rank, iface, n)
                if g is not None:
                    assert_close(g, ref_grads[n], msg=f"rank {rank} {iface} grad {n}")
