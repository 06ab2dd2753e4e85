# SPDX-License-Identifier: Apache-2.0
"""The shard_particles handler on its own, around a stock Pyro estimator."""

from __future__ import annotations

import re

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_sp import RNGStream
from pyro_sp.poutine import ShardParticlesMessenger, shard_particles
from tests.common import assert_close, pinned_noise
from tests.models import NUM_DATA, make_data, model, param_guide

N = 7


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)  # restored by conftest


def _loss(lo, hi, **kwargs):
    x, y = make_data(0)
    elbo = Trace_ELBO(num_particles=N, vectorize_particles=True, max_plate_nesting=1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        with pinned_noise(N, lo, hi):
            if (lo, hi) == (0, N):
                return elbo.loss(model, param_guide, x, y, **kwargs)
            with shard_particles(lo=lo, hi=hi, num_particles=N):
                return elbo.loss(model, param_guide, x, y, **kwargs)


@pytest.mark.parametrize("cuts", [(0, 3, 7), (0, 1, 2, 7), (0, 4, 5, 6, 7)])
def test_shares_add_up_to_the_full_estimator(cuts):
    kwargs = {"subsample": torch.arange(0, NUM_DATA, 3)}
    full = _loss(0, N, **kwargs)
    parts = [_loss(lo, hi, **kwargs) for lo, hi in zip(cuts[:-1], cuts[1:])]
    assert_close(sum(parts), full)


def test_particle_plate_has_local_size_and_no_rescaling():
    x, y = make_data(0)
    elbo = Trace_ELBO(num_particles=N, vectorize_particles=True, max_plate_nesting=1)
    seen = []
    orig = elbo._get_trace

    def spy(model_, guide_, args, kwargs):
        traces = orig(model_, guide_, args, kwargs)
        seen.extend(s for s in traces[0].nodes.values() if s["type"] == "sample")
        return traces

    elbo._get_trace = spy
    with shard_particles(lo=2, hi=5, num_particles=N):
        elbo.loss(model, param_guide, x, y, subsample=torch.arange(6))
    obs = next(s for s in seen if s["name"] == "obs")
    frame = obs["cond_indep_stack"][0]
    assert frame.name == "num_particles_vectorized" and frame.size == 3
    assert obs["value"].shape == (6,) and obs["fn"].batch_shape == (3, 6)
    # the data plate keeps its N/n scale, the particle plate's is taken back
    assert obs["scale"] == pytest.approx(NUM_DATA / 6, rel=1e-15)


def test_wrong_num_particles_is_an_error():
    x, y = make_data(0)
    elbo = Trace_ELBO(num_particles=6, vectorize_particles=True)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Expected the particle plate 'num_particles_vectorized' to have size 8 (the global "
            "num_particles), got 6. Give the distributed ELBO the same num_particles on every rank."
        ),
    ):
        with shard_particles(lo=0, hi=4, num_particles=8):
            elbo.loss(model, param_guide, x, y)


@pytest.mark.parametrize("lo,hi,n", [(3, 2, 4), (-1, 2, 4), (0, 5, 4)])
def test_bad_share_is_an_error(lo, hi, n):
    expected = f"Expected 0 <= lo <= hi <= num_particles, got lo={lo}, hi={hi}, num_particles={n}."
    with pytest.raises(ValueError, match=re.escape(expected)):
        ShardParticlesMessenger(lo, hi, n)


def test_empty_share_evaluates_one_stand_in_particle():
    m = ShardParticlesMessenger(4, 4, 4)
    assert (m.empty, m.lo, m.hi) == (True, 3, 4)
    assert not ShardParticlesMessenger(0, 1, 4).empty


def test_subsample_stream_is_independent_of_the_global_rng():
    x, y = make_data(0)
    seen = []

    def recording_model(x, y):
        with pyro.plate("data", NUM_DATA, subsample_size=5) as idx:
            seen.append(idx.clone())

    def guide(x, y):
        pass

    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    for global_seed, stream_seed in ((1, 42), (2, 42), (1, 43)):
        torch.manual_seed(global_seed)
        with shard_particles(lo=0, hi=2, num_particles=4, subsample_rng=RNGStream(stream_seed)):
            elbo.loss(recording_model, guide, x, y)
    for idx in seen:  # a subsample: 5 distinct rows of the data
        assert idx.shape == (5,) and len(set(idx.tolist())) == 5 and 0 <= idx.min() and idx.max() < NUM_DATA
    assert torch.equal(seen[0], seen[1]), "the global RNG changed the subsample"
    assert not torch.equal(seen[0], seen[2]), "the subsample does not come from the stream"
