# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as tdist

import pyro_sp
from pyro_sp.distributed.mesh import particle_share


@pytest.mark.parametrize("num_particles", [1, 2, 3, 7, 8, 64, 65])
@pytest.mark.parametrize("sample", [1, 2, 3, 4, 8])
def test_particle_share_matches_tensor_split(num_particles, sample):
    parts = torch.arange(num_particles).tensor_split(sample)
    for i, part in enumerate(parts):
        lo, hi = particle_share(num_particles, sample, i)
        assert part.tolist() == list(range(lo, hi))
        assert hi > lo or (num_particles < sample and lo == hi == num_particles)


def test_particle_share_rejects_bad_counts():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=re.escape(f"Expected a positive integer num_particles, got {bad!r}.")):
            particle_share(bad, 2, 0)


def test_particle_share_rejects_bad_index():
    for bad in (2, -1):
        with pytest.raises(ValueError, match=re.escape(f"Expected 0 <= sample_index < 2, got sample_index={bad}.")):
            particle_share(8, 2, bad)


def test_single_process_mesh():
    mesh = pyro_sp.init_mesh()
    assert mesh == pyro_sp.SPMesh()
    assert mesh.particle_share(5) == (0, 5)
    assert mesh.data_shard() == (0, 1)
    with pytest.raises(RuntimeError, match=re.escape("The single-process mesh has no 'sample' group.")):
        mesh.get_group("sample")
    with pytest.raises(ValueError, match=re.escape("Expected axis 'sample', 'data' or 'world', got 'tensor'.")):
        mesh.get_group("tensor")


def test_degree_errors_print_every_value():
    with pytest.raises(ValueError) as e:
        pyro_sp.SPMesh(sample=2, data=3)
    assert str(e.value) == (
        "Expected sample * data == world size, got sample=2, data=3 (product 6) on world size 1. "
        "Choose degrees whose product is the number of ranks."
    )
    with pytest.raises(ValueError) as e:
        pyro_sp.SPMesh(sample=1, data=True)
    assert str(e.value) == "Expected positive integer mesh degrees, got sample=1, data=True (data is invalid)."


@pytest.mark.parametrize("sample,data", [(4, 2), (8, 4), (1, 8), (8, 1)])
def test_fake_layouts(sample, data):
    """Layouts that cannot be spawned here, checked with the fake backend."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world = sample * data
    rank = world - 2 if world > 1 else 0
    tdist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        mesh = pyro_sp.init_mesh(sample=sample)
        assert (mesh.sample, mesh.data) == (sample, data)
        assert mesh.sample_index == rank % sample and mesh.data_index == rank // sample
        sample_ranks = tdist.get_process_group_ranks(mesh.get_group("sample"))
        data_ranks = tdist.get_process_group_ranks(mesh.get_group("data"))
        assert sample_ranks == [mesh.data_index * sample + s for s in range(sample)]
        assert data_ranks == [d * sample + mesh.sample_index for d in range(data)]
        assert pyro_sp.init_mesh(data=data) == mesh
        bad = 3 if world % 3 else 5
        with pytest.raises(ValueError) as e:
            pyro_sp.init_mesh(sample=bad)
        assert str(e.value) == (
            f"Expected sample to be a positive divisor of the world size {world}, got sample={bad}, "
            f"data=None. Launch a multiple of {bad} ranks or change sample."
        )
        # this rank's share is its slice of torch.tensor_split over the sample axis
        share = torch.arange(3 * sample + 1).tensor_split(sample)[mesh.sample_index]
        lo, hi = mesh.particle_share(3 * sample + 1)
        assert list(range(lo, hi)) == share.tolist()
    finally:
        tdist.destroy_process_group()
