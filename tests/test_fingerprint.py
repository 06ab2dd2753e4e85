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
    # a 0-d int64 tensor below 2**16 (sums of squares over a sample group stay exact in float64)
    value = data_fingerprint((x,), {"y": x.sum(-1), "n": 3})
    assert value.dtype == torch.int64 and value.dim() == 0 and int(value) == one
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
    # more than MAX_ELEMENTS elements are read at a stride (here every third): a change at a read
    # element counts, one between them is not seen (the documented price of a cheap check)
    read, skipped = big.clone(), big.clone()
    read[3 * 1000] = 1.0
    skipped[3 * 1000 + 1] = 1.0
    assert fp(read) != fp(big)
    assert fp(skipped) == fp(big)
    odd = (torch.ones(2, dtype=torch.bool), torch.arange(3), 2.5, "s", object())
    assert fp(*odd) == fp(torch.ones(2, dtype=torch.bool), torch.arange(3), 2.5, "s", object())
    # scalars and strings by value, other objects by type only
    assert fp(*odd[:3], "t", object()) != fp(*odd)
    assert fp(*odd[:2], 2.25, "s", object()) != fp(*odd)
    assert fp(*odd[:4], []) != fp(*odd)
    assert fp(*odd[:4], 1j) != fp(*odd)


def test_describe_data_names_every_leaf():
    x = torch.ones(2)
    desc = describe_data((x, [x.double(), None]), {"y": 3, "s": "a", "o": object()})
    assert list(desc) == ["args[0]", "args[1][0]", "args[1][1]", "kwargs['o']", "kwargs['s']", "kwargs['y']"]
    (shape, dtype, value), (shape64, dtype64, value64) = desc["args[0]"], desc["args[1][0]"]
    assert (shape, dtype, shape64, dtype64) == ((2,), "torch.float32", (2,), "torch.float64")
    assert value != value64, "float32 and float64 ones have other bits"
    assert 0 <= value < 1 << 32 and describe_data((x.clone(),), {})["args[0]"] == desc["args[0]"]
    assert describe_data((x + 1,), {})["args[0]"][2] != value
    assert desc["args[1][1]"] == ("value", "None")
    assert (desc["kwargs['o']"], desc["kwargs['s']"], desc["kwargs['y']"]) == (("object", "object"), ("value", "'a'"), ("value", "3"))
