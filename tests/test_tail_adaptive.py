# SPDX-License-Identifier: Apache-2.0
"""Tail-adaptive ranks: Pyro's convention (checked against Pyro in
test_estimators) and the paper's tail-probability ranks."""

from __future__ import annotations

import re

import pyro
import pytest
import torch

import pyro_sp
from pyro_sp.infer import tail_adaptive_weights
from tests.common import assert_close, particle_seed, pinned_noise
from tests.test_estimators import _x, local_guide, local_model

BETA = -0.5


def test_weights_by_hand():
    log_pq = torch.tensor([0.3, -1.0, 2.0, 0.3])
    # paper: gamma_k = #{j : w_j >= w_k} ** beta (ties count), largest weight -> rank 1
    expected = torch.tensor([3.0, 4.0, 1.0, 3.0]) ** BETA
    assert torch.equal(tail_adaptive_weights(log_pq, BETA, "tail"), expected)
    # Pyro 1.9: gamma_k = (argsort(log_pq)[k] + 1) ** beta
    distinct = torch.tensor([0.3, -1.0, 2.0, 0.5])  # argsort = [1, 0, 3, 2]
    assert torch.equal(tail_adaptive_weights(distinct, BETA, "pyro"), torch.tensor([2.0, 1.0, 4.0, 3.0]) ** BETA)
    with pytest.raises(ValueError, match=re.escape("Expected ranks in ('pyro', 'tail'), got 'descending'.")):
        tail_adaptive_weights(log_pq, BETA, "descending")
    with pytest.raises(ValueError, match=re.escape("Expected ranks in ('pyro', 'tail'), got 'sorted'.")):
        pyro_sp.DistributedTraceTailAdaptive_ELBO(num_particles=4, ranks="sorted")


def tail_case(sample: int, num_particles: int, ranks: str):
    mesh = pyro_sp.SPMesh(sample=sample)
    x = _x(0)
    elbo = pyro_sp.DistributedTraceTailAdaptive_ELBO(
        vectorize_particles=True, num_particles=num_particles, mesh=mesh, ranks=ranks, tail_adaptive_beta=BETA
    )
    elbo.loss_and_grads(local_model, local_guide, x)
    state = pyro.get_param_store().get_state()
    state = {"params": {n: v.detach().clone() for n, v in state["params"].items()}, "constraints": dict(state["constraints"])}
    for _, p in pyro.get_param_store().named_parameters():
        p.grad = None
    lo, hi = mesh.particle_share(num_particles)
    with pinned_noise(num_particles, lo, hi), particle_seed(elbo, 5):
        elbo.loss_and_grads(local_model, local_guide, x)
    return state, {n: p.grad.clone() for n, p in pyro.get_param_store().named_parameters()}


def _single_process(state, num_particles, ranks):
    pyro.clear_param_store()
    pyro.get_param_store().set_state(
        {"params": {n: v.clone().requires_grad_() for n, v in state["params"].items()}, "constraints": state["constraints"]}
    )
    elbo = pyro_sp.DistributedTraceTailAdaptive_ELBO(
        vectorize_particles=True, num_particles=num_particles, ranks=ranks, tail_adaptive_beta=BETA, max_plate_nesting=1
    )
    with pinned_noise(num_particles, 0, num_particles), particle_seed(elbo, 5):
        elbo.loss_and_grads(local_model, local_guide, _x(0))
    return {n: p.grad.clone() for n, p in pyro.get_param_store().named_parameters()}


@pytest.mark.parametrize("sample,num_particles", [(2, 7), (3, 8)])
def test_paper_ranks_distributed_equal_single_process(pools, sample, num_particles):
    results = pools(sample).run(tail_case, sample, num_particles, "tail")
    torch.set_default_dtype(torch.float64)
    state = results[0][0]
    expected = _single_process(state, num_particles, "tail")
    pyro_convention = _single_process(state, num_particles, "pyro")
    for _, grads in results:
        for n, g in grads.items():
            assert_close(g, expected[n], msg=n)
    assert any(not torch.allclose(expected[n], pyro_convention[n]) for n in expected), (
        "the two rank conventions gave the same gradient"
    )
