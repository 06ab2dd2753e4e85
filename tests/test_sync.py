# SPDX-License-Identifier: Apache-2.0
"""Synchronisation rules: parameter and buffer broadcast (lazy and late
parameters), increment-only gradient reduction, the PyTorch-native module
path, and the random streams of particles and subsamples."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as tdist
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.nn import PyroModule, PyroParam, PyroSample

import pyro_sp
from pyro_sp.distributed.streams import derive_seed
from tests.common import assert_close, particle_seed, pinned_noise
from tests.models import make_data, make_guide, model, param_guide


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(tdist.get_world_size())]
    tdist.all_gather(out, t.contiguous())
    return out


def _flat_store() -> torch.Tensor:
    store = pyro.get_param_store()
    return torch.cat([store[n].unconstrained().detach().reshape(-1) for n in sorted(store.keys())])


def lazy_params_are_broadcast():
    """AutoDiagonalNormal initialises from a prior draw: different on each rank until synced."""
    torch.manual_seed(100 + tdist.get_rank())
    x, y = make_data(0)
    guide = AutoDiagonalNormal(model, init_scale=0.3)
    with torch.no_grad():  # a plain guide call shows the unsynchronised value
        pyro.poutine.block(guide)(x, y)
    before = _gather(guide.loc.detach().clone())
    pyro.set_rng_seed(0)  # the ranks of a sample group must agree on the global RNG at the call
    elbo = pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=4, mesh=pyro_sp.SPMesh(sample=2))
    elbo.loss_and_grads(model, guide, x, y)
    after = _gather(_flat_store())
    grads = _gather(pyro.param("AutoDiagonalNormal.loc").unconstrained().grad)
    return {
        "differed_before": not torch.equal(before[0], before[1]),
        "equal_after": all(torch.equal(a, after[0]) for a in after),
        "grads_equal": all(torch.equal(g, grads[0]) for g in grads),
    }


def test_lazy_params_are_broadcast(pools):
    for r in pools(2).run(lazy_params_are_broadcast):
        assert r == {"differed_before": True, "equal_after": True, "grads_equal": True}


def _growing_guide(x, y, extra=False):
    param_guide(x, y)
    if extra:
        pyro.param("late", torch.randn(3))  # a random init: differs across ranks
        pyro.sample("late_z", dist.Normal(pyro.param("late"), 1.0).to_event(1))


def _growing_model(x, y, extra=False):
    model(x, y)
    if extra:
        pyro.sample("late_z", dist.Normal(torch.zeros(3), 1.0).to_event(1))


def late_param_is_broadcast_before_its_gradient():
    # the late parameter is created in a call's own run, from each rank's particle stream:
    # it differs across ranks until broadcast
    torch.manual_seed(0)
    x, y = make_data(0)
    elbo = pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=4, mesh=pyro_sp.SPMesh(sample=2))
    for _ in range(2):
        elbo.loss_and_grads(_growing_model, _growing_guide, x, y)
    lo, hi = elbo.mesh.particle_share(4)
    with pinned_noise(4, lo, hi), particle_seed(elbo, 3):
        loss = elbo.loss_and_grads(_growing_model, _growing_guide, x, y, extra=True)
    late = pyro.param("late").unconstrained()
    values, grads = _gather(late.detach().clone()), _gather(late.grad.clone())
    state = pyro.get_param_store().get_state()
    # the single-process reference from the synchronised values
    pyro.clear_param_store()
    pyro.get_param_store().set_state(
        {
            "params": {n: v.detach().clone().requires_grad_() for n, v in state["params"].items()},
            "constraints": dict(state["constraints"]),
        }
    )
    ref = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    with pinned_noise(4, 0, 4), particle_seed(ref, 3):
        ref_loss = ref.loss_and_grads(_growing_model, _growing_guide, x, y, extra=True)
    return loss, ref_loss, values, grads, pyro.param("late").unconstrained().grad


def test_late_param_is_broadcast_before_its_gradient(pools):
    for loss, ref_loss, values, grads, ref_grad in pools(2).run(late_param_is_broadcast_before_its_gradient):
        assert torch.equal(values[0], values[1])
        assert torch.equal(grads[0], grads[1])
        assert_close(loss, ref_loss)
        assert_close(grads[0], ref_grad)


def only_the_increment_is_reduced():
    x, y = make_data(0)
    elbo = pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=6, mesh=pyro_sp.SPMesh(sample=2))
    elbo.loss(model, param_guide, x, y)
    lo, hi = elbo.mesh.particle_share(6)
    p = pyro.param("w_loc").unconstrained()
    with pinned_noise(6, lo, hi), particle_seed(elbo, 9):
        elbo.loss_and_grads(model, param_guide, x, y)
    once = p.grad.clone()
    p.grad = torch.full_like(p, 0.25)  # an earlier, already reduced gradient
    with pinned_noise(6, lo, hi), particle_seed(elbo, 9):
        elbo.loss_and_grads(model, param_guide, x, y)
    after_preset = p.grad.clone()
    with pinned_noise(6, lo, hi), particle_seed(elbo, 9):
        elbo.loss_and_grads(model, param_guide, x, y)
    return once, after_preset, p.grad.clone()


def test_only_the_increment_is_reduced(pools):
    for once, after_preset, accumulated in pools(2).run(only_the_increment_is_reduced):
        assert_close(after_preset, once + 0.25)
        assert_close(accumulated, 2 * once + 0.25)


class BayesianRegression(PyroModule):
    def __init__(self):
        super().__init__()
        self.linear = PyroModule[torch.nn.Linear](3, 1)
        self.linear.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 3]).to_event(2))
        self.bias = PyroParam(torch.tensor(0.1))
        self.register_buffer("offset", torch.tensor(0.0))

    def forward(self, x, y):
        w = self.linear.weight.squeeze(-2)  # (particles, 1, 3): no extra dimension
        mean = (x * w).sum(-1) + self.bias + self.offset
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)


def module_path(local_params: bool, data: int):
    """``elbo(model, guide)`` as a torch.nn.Module, torch.optim, ``loss.backward()``."""
    pyro.settings.set(module_local_params=local_params)
    sample = tdist.get_world_size() // data
    mesh = pyro_sp.SPMesh(sample=sample, data=data)
    torch.manual_seed(tdist.get_rank())  # unsynchronised initial values
    x, y = make_data(30 + mesh.data_index)
    regression = BayesianRegression()
    regression.offset.fill_(float(tdist.get_rank()))  # a buffer that differs until synced
    guide = AutoNormal(regression, init_scale=0.3)
    pyro.set_rng_seed(5)  # a sample group's ranks must agree on the global RNG when they call
    elbo_fn = pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=5, mesh=mesh)
    elbo = elbo_fn(regression, guide)
    elbo(x, y)  # data-dependent initialisation, as in Pyro's docs
    named = sorted(elbo.named_parameters())
    optim = torch.optim.Adam([p for _, p in named], lr=0.02)
    spread = 0.0
    for _ in range(5):
        optim.zero_grad()
        elbo(x, y).backward()
        optim.step()
        flat = torch.cat([p.detach().reshape(-1) for _, p in named] + [regression.offset.reshape(1)])
        spread = max(spread, max((g - flat).abs().max().item() for g in _gather(flat)))
    # exactness of one backward against the single-process module path
    lo, hi = mesh.particle_share(5)
    optim.zero_grad()
    with pinned_noise(5, lo, hi), particle_seed(elbo_fn, 11 + mesh.data_index):
        loss = elbo(x, y)
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in named}
    values = {n: p.detach().clone() for n, p in named}
    return mesh.data_index, loss.item(), grads, values, spread, dict(regression.state_dict())


def module_reference(local_params: bool, data: int, values, state):
    pyro.settings.set(module_local_params=local_params)
    loss, grads = 0.0, {}
    for d in range(data):
        pyro.clear_param_store()
        x, y = make_data(30 + d)
        regression = BayesianRegression()
        guide = AutoNormal(regression, init_scale=0.3)
        elbo_fn = Trace_ELBO(num_particles=5, vectorize_particles=True)
        elbo = elbo_fn(regression, guide)
        elbo(x, y)
        regression.load_state_dict(state, strict=False)
        named = dict(elbo.named_parameters())
        with torch.no_grad():
            for n, v in values.items():
                named[n].copy_(v)
        with pinned_noise(5, 0, 5), particle_seed(elbo_fn, 11 + d):
            loss_d = elbo(x, y)
        loss_d.backward()
        loss += loss_d.item() / data
        for n, p in named.items():
            grads[n] = None if p.grad is None else grads.get(n, 0.0) + p.grad / data
    return loss, grads


@pytest.mark.parametrize("local_params", [True, False], ids=["module_local_params", "param_store"])
@pytest.mark.parametrize("world,data", [(2, 1), (4, 2)], ids=["sample2", "hybrid2x2"])
def test_module_path(pools, local_params, world, data):
    results = pools(world).run(module_path, local_params, data)
    _, _, _, values, _, state = results[0]
    assert values, "no parameters"
    torch.set_default_dtype(torch.float64)
    pyro.enable_validation(True)
    ref_loss, ref_grads = module_reference(local_params, data, values, state)
    for _, loss, grads, vals, spread, st in results:
        assert spread == 0.0, f"parameters or buffers differed across ranks by {spread}"
        assert set(grads) == set(ref_grads)
        assert_close(loss, ref_loss, msg="loss")
        assert sum(g is not None for g in grads.values()) >= 3
        for n, g in grads.items():
            assert (g is None) == (ref_grads[n] is None), n
            if g is not None:
                assert_close(g, ref_grads[n], msg=n)
            assert torch.equal(vals[n], values[n])
        assert torch.equal(st["offset"], state["offset"])


_SEEN: list = []
_DRAWS: list = []


def _recording_model(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    with pyro.plate("data", x.shape[0], subsample_size=6) as idx:
        _SEEN.append(idx.clone())
        pyro.sample("obs", dist.Normal((x[idx] * w).sum(-1), 0.5), obs=y[idx])


def random_streams():
    """Subsample indices: same across the sample axis, different across data. Particles: differ."""
    pyro.set_rng_seed(0)  # the same global seed on every rank, as users often do
    mesh = pyro_sp.SPMesh(sample=2, data=2)
    x, y = make_data(0)
    elbo = pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=4, mesh=mesh)
    guide = make_guide("normal", _recording_model)

    def recording_guide(x, y, **kwargs):
        out = guide(x, y, **kwargs)
        _DRAWS.append(out["w"].detach().clone())
        return out

    elbo.loss(_recording_model, recording_guide, x, y)  # setup
    rng_before = torch.get_rng_state()
    _SEEN.clear()
    _DRAWS.clear()
    for _ in range(3):
        elbo.loss(_recording_model, recording_guide, x, y)
    idx = torch.stack([i.sort().values for i in _SEEN])
    # each call takes one key from the global RNG and leaves it reseeded from the key,
    # whatever the rank computed
    expected = torch.Generator()
    expected.set_state(rng_before)
    for _ in range(3):
        key = int(torch.randint(0, 1 << 62, (), dtype=torch.int64, generator=expected))
        expected.manual_seed(derive_seed(key, "global"))
    return mesh.sample_index, mesh.data_index, idx, torch.stack(_DRAWS), torch.equal(expected.get_state(), torch.get_rng_state())


def test_random_streams(pools):
    results = pools(4).run(random_streams)
    by_coord = {(s, d): (idx, draws) for s, d, idx, draws, _ in results}
    for d in range(2):
        assert torch.equal(by_coord[(0, d)][0], by_coord[(1, d)][0]), "sample ranks saw different subsamples"
    assert not torch.equal(by_coord[(0, 0)][0], by_coord[(0, 1)][0]), "data groups saw the same subsample"
    assert not torch.equal(by_coord[(0, 0)][0][0], by_coord[(0, 0)][0][1]), "subsample did not change across calls"
    draws = [by_coord[c][1] for c in sorted(by_coord)]
    assert draws[0].shape[1] == 2, "expected 2 of the 4 particles on each rank"
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(draws[i], draws[j]), "two ranks drew the same particle noise"
    assert all(r[4] for r in results), "a call did not leave the global RNG reseeded from its key"
    # rank 0 draws from the global stream: successive calls must not replay it shifted
    calls = by_coord[(0, 0)][1]
    values = [set(c.flatten().tolist()) for c in calls]
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            assert not values[i] & values[j], "rank 0 replayed noise of an earlier call"


def earlier_gradient_of_a_param_unused_last_call():
    """A parameter used now but not in the previous call keeps its earlier gradient."""
    x, y = make_data(0)
    elbo = pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=4, mesh=pyro_sp.SPMesh(sample=2))
    elbo.loss_and_grads(_growing_model, _growing_guide, x, y, extra=True)  # creates and syncs "late"
    late = pyro.param("late").unconstrained()
    lo, hi = elbo.mesh.particle_share(4)
    out = []
    for preset in (None, 10.0):
        elbo.loss_and_grads(_growing_model, _growing_guide, x, y)  # "late" unused in this call
        late.grad = None if preset is None else torch.full_like(late, preset)
        with pinned_noise(4, lo, hi), particle_seed(elbo, 21):
            elbo.loss_and_grads(_growing_model, _growing_guide, x, y, extra=True)
        out.append(late.grad.clone())
    return out


def test_earlier_gradient_of_a_param_unused_last_call(pools):
    for increment, with_preset in pools(2).run(earlier_gradient_of_a_param_unused_last_call):
        assert_close(with_preset, increment + 10.0)
