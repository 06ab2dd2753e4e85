# SPDX-License-Identifier: Apache-2.0
"""One process, no process group: bit-identical to the Pyro estimator replaced."""

from __future__ import annotations

import pyro
import pytest
import torch
import torch.distributed as tdist
from pyro.infer import SVI

import pyro_sp
from tests.models import ESTIMATORS, make_data, make_guide, model


@pytest.mark.parametrize("estimator", ["trace", "meanfield", "jit"])
@pytest.mark.parametrize("guide_kind", ["normal", "diag", "param"])
def test_svi_bit_identical(estimator, guide_kind):
    assert not tdist.is_initialized()
    dist_cls, pyro_cls = ESTIMATORS[estimator]
    x, y = make_data(0)
    runs = []
    for loss in (
        dist_cls(num_particles=6, vectorize_particles=True),
        pyro_cls(num_particles=6, vectorize_particles=True),
    ):
        pyro.clear_param_store()
        pyro.set_rng_seed(123)
        guide = make_guide(guide_kind, model)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=loss)
        losses = [svi.step(x, y, subsample_size=10) for _ in range(5)]
        params = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
        runs.append((losses, params))
    (l1, p1), (l2, p2) = runs
    assert l1 == l2
    assert p1.keys() == p2.keys()
    for n in p1:
        assert torch.equal(p1[n], p2[n]), n


def test_mesh_is_single_process():
    mesh = pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=3).mesh
    assert (mesh.sample, mesh.data, mesh.rank, mesh.world_size) == (1, 1, 0, 1)
    assert not mesh.is_distributed
    assert mesh.get_optional_group("sample") is None
