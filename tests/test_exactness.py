# SPDX-License-Identifier: Apache-2.0
"""Exactness: with pinned particle noise, every distributed estimator equals
the single-process Pyro estimator it replaces (float64, <= 1e-10 relative)
in loss and in every parameter gradient, on every interface."""

from __future__ import annotations

import pyro
import pytest
import torch

import pyro_sp
from tests.common import assert_close, particle_seed, pinned_noise
from tests.models import ESTIMATORS, NUM_DATA, make_data, make_guide, model, model_noplate

SUBSAMPLE = 8


def _inputs(data_index: int, plate: str):
    x, y = make_data(seed=10 + data_index)
    if plate == "none":
        return model_noplate, (x, y), {}
    if plate == "full":
        return model, (x, y), {}
    g = torch.Generator().manual_seed(20 + data_index)
    idx = torch.randperm(NUM_DATA, generator=g, device="cpu")[:SUBSAMPLE]
    return model, (x, y), {"subsample": idx.to(torch.get_default_device())}


def _params():
    store = pyro.get_param_store()
    return {name: store[name].unconstrained() for name in store.keys()}


def _grads():
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in _params().items()}


def _zero_grads():
    for p in _params().values():
        p.grad = None


def exact_case(estimator: str, guide_kind: str, num_particles: int, plate: str, sample: int, data: int):
    """Runs on every rank of a pool of ``sample * data`` ranks."""
    dist_cls, pyro_cls = ESTIMATORS[estimator]
    mesh = pyro_sp.SPMesh(sample=sample, data=data)
    d = mesh.data_index
    model_fn, args, kwargs = _inputs(d, plate)
    guide = make_guide(guide_kind, model_fn)
    elbo = dist_cls(num_particles=num_particles, mesh=mesh, vectorize_particles=True)
    elbo.loss(model_fn, guide, *args, **kwargs)  # creates and broadcasts the parameters
    lo, hi = mesh.particle_share(num_particles)
    with pinned_noise(num_particles, lo, hi):  # compiles the JIT estimators with pinned noise
        elbo.loss_and_grads(model_fn, guide, *args, **kwargs)
    snapshot = {n: p.detach().clone() for n, p in _params().items()}
    state = pyro.get_param_store().get_state()
    seed = 7 + 100 * d

    _zero_grads()
    with pinned_noise(num_particles, lo, hi), particle_seed(elbo, seed):
        loss_lg = elbo.loss_and_grads(model_fn, guide, *args, **kwargs)
    grads_lg = _grads()
    with pinned_noise(num_particles, lo, hi), particle_seed(elbo, seed):
        loss_l = elbo.loss(model_fn, guide, *args, **kwargs)
    _zero_grads()
    with pinned_noise(num_particles, lo, hi), particle_seed(elbo, seed):
        surrogate = elbo.differentiable_loss(model_fn, guide, *args, **kwargs)
    surrogate.backward()
    grads_dl = _grads()

    # single-process references, one per data group, averaged over the data axis
    ref_loss, ref_loss_l, ref_grads = 0.0, 0.0, {}
    for dd in range(data):
        pyro.clear_param_store()
        pyro.get_param_store().set_state(
            {
                "params": {
                    n: v.detach().clone().requires_grad_() for n, v in state["params"].items()
                },
                "constraints": dict(state["constraints"]),
            }
        )
        ref_model, ref_args, ref_kwargs = _inputs(dd, plate)
        ref_guide = make_guide(guide_kind, ref_model)
        with pyro.poutine.block():
            ref_guide(*ref_args, **ref_kwargs)  # set up the autoguide prototype
        for name, value in snapshot.items():
            assert torch.equal(_params()[name].detach(), value), f"reference param {name} changed"
        ref = pyro_cls(
            num_particles=num_particles,
            vectorize_particles=True,
            max_plate_nesting=elbo.max_plate_nesting - 1,
        )
        with pinned_noise(num_particles, 0, num_particles):  # JIT compilation
            ref.loss_and_grads(ref_model, ref_guide, *ref_args, **ref_kwargs)
        _zero_grads()
        with pinned_noise(num_particles, 0, num_particles), particle_seed(ref, 7 + 100 * dd):
            ref_loss += ref.loss_and_grads(ref_model, ref_guide, *ref_args, **ref_kwargs) / data
        for n, g in _grads().items():
            ref_grads[n] = ref_grads.get(n, 0.0) + g / data
        with pinned_noise(num_particles, 0, num_particles), particle_seed(ref, 7 + 100 * dd):
            ref_loss_l += ref.loss(ref_model, ref_guide, *ref_args, **ref_kwargs) / data
    return {
        "loss_lg": loss_lg,
        "loss_l": loss_l,
        "loss_dl": surrogate.item(),
        "grads_lg": grads_lg,
        "grads_dl": grads_dl,
        "ref_loss": ref_loss,
        "ref_loss_l": ref_loss_l,
        "ref_grads": ref_grads,
    }


def _check(results):
    first = results[0]
    assert first["ref_grads"], "no parameters were compared"
    for rank, r in enumerate(results):
        for key, ref in (("loss_lg", "ref_loss"), ("loss_l", "ref_loss_l"), ("loss_dl", "ref_loss")):
            assert_close(r[key], first[ref], msg=f"rank {rank} {key}")
        for kind in ("grads_lg", "grads_dl"):
            assert set(r[kind]) == set(first["ref_grads"]), (rank, kind)
            for n, g in r[kind].items():
                assert g is not None, f"rank {rank}: no gradient for {n}"
                assert_close(g, first["ref_grads"][n], msg=f"rank {rank} {kind} {n}")


GRID = [
    # (world as sample x data, num_particles)
    pytest.param(1, 1, 5, id="w1"),
    pytest.param(2, 1, 8, id="w2-even"),
    pytest.param(2, 1, 7, id="w2-uneven"),
    pytest.param(3, 1, 9, id="w3-even"),
    pytest.param(3, 1, 7, id="w3-uneven"),
    pytest.param(2, 2, 5, id="hybrid2x2-uneven"),
]


@pytest.mark.parametrize("sample,data,num_particles", GRID)
@pytest.mark.parametrize("guide_kind", ["normal", "diag", "lowrank", "param"])
@pytest.mark.parametrize("plate", ["subsample", "none"])
def test_trace_elbo_exact(pools, sample, data, num_particles, guide_kind, plate):
    results = pools(sample * data).run(
        exact_case, "trace", guide_kind, num_particles, plate, sample, data
    )
    _check(results)


@pytest.mark.parametrize("sample,data,num_particles", GRID)
@pytest.mark.parametrize("estimator", ["jit", "meanfield"])
@pytest.mark.parametrize("guide_kind", ["normal", "param"])
def test_other_estimators_exact(pools, sample, data, num_particles, estimator, guide_kind):
    results = pools(sample * data).run(
        exact_case, estimator, guide_kind, num_particles, "subsample", sample, data
    )
    _check(results)


@pytest.mark.parametrize("estimator", ["jit", "meanfield"])
@pytest.mark.parametrize("guide_kind", ["diag", "lowrank"])
def test_other_estimators_exact_more_guides(pools, estimator, guide_kind):
    results = pools(3).run(exact_case, estimator, guide_kind, 7, "none", 3, 1)
    _check(results)


@pytest.mark.parametrize("sample,data,num_particles", [(3, 1, 7), (2, 2, 5)], ids=["w3-uneven", "hybrid2x2"])
def test_autodelta_exact(pools, sample, data, num_particles):
    results = pools(sample * data).run(exact_case, "trace", "delta", num_particles, "subsample", sample, data)
    _check(results)
