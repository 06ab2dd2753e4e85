# SPDX-License-Identifier: Apache-2.0
"""The data fingerprint: equal arguments agree exactly, different ones differ."""

from __future__ import annotations

import torch

from pyro_sp.distributed.fingerprint import MAX_ELEMENTS, data_fingerprint, describe_data


def fp(*args, **kwargs) -> int:
    return int(data_fingerprint(args, kwargs))


def test_equal_arguments_agree_whatever_the_threads():
    x = torch.randn(500, 7, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fp(x, y=x.sum(-1), n=3)
        torch.set_num_threads(2)
        two = fp(x.clone(), y=x.sum(-1).clone(), n=3)
    finally:
        torch.set_num_threads(before)
    assert one == two
    assert 0 <= one < 1 << 16


def test_values_order_shapes_dtypes_and_names_count():
    x = torch.randn(64, generator=torch.Generator().manual_seed(1))
    changed = x.clone()
    changed[17] = torch.nextafter(changed[17], torch.tensor(10.0))  # one ulp
    base = fp(x)
    others = [
        fp(changed),
        fp(x.flip(0)),
        fp(x.reshape(8, 8)),
        fp(x.double()),
        fp(x=x),
        fp(x, 1),
        fp(x, extra=None),
        int(data_fingerprint((x,), {}, extra=(123,))),
    ]
    assert all(o != base for o in others), others
    assert fp(torch.zeros(3)) == fp(-torch.zeros(3))  # -0.0 == 0.0
    assert fp(torch.full((3,), 1.0)) != fp(torch.full((3,), 2.0))


def test_large_tensors_and_odd_leaves():
    big = torch.zeros(MAX_ELEMENTS * 3)
    assert fp(big) == fp(big.clone())
    assert fp(torch.ones(2, dtype=torch.bool), torch.arange(3), 2.5, "s", object()) == fp(
        torch.ones(2, dtype=torch.bool), torch.arange(3), 2.5, "s", object()
    )
    assert set(describe_data((torch.ones(2),), {"y": 3})) == {"args[0]", "kwargs['y']"}
