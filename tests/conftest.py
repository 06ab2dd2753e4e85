# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

import pyro
import pytest
import torch

from tests.common import RankPool

_POOLS: dict[int, RankPool] = {}


def get_pool(world: int) -> RankPool:
    """A pool of ``world`` gloo ranks, spawned on first use and kept for the session."""
    pool = _POOLS.get(world)
    if pool is None or not pool.alive():
        pool = _POOLS[world] = RankPool(world)
    return pool


@pytest.fixture(scope="session")
def pools():
    yield get_pool
    for pool in _POOLS.values():
        pool.close()


@pytest.fixture(autouse=True)
def _clean_pyro_state():
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.settings.set(module_local_params=False)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    pyro.clear_param_store()
