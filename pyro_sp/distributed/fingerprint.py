# SPDX-License-Identifier: Apache-2.0
"""A cheap fingerprint of the data a distributed call receives.

The ranks of one sample group must call an estimator with the same data (and
the same random state): they split the particles of *one* estimate. Nothing in
Pyro would notice if they did not — training would run to a wrong answer with
identical parameters on every rank. :func:`data_fingerprint` condenses the
arguments of a call into a 16-bit number that the per-step check compares
across the ranks of each sample group (see :func:`pyro_sp.distributed.guard.step_check`).

What enters it:

- the structure of ``args``/``kwargs``: positions and keyword names, tensor
  shapes and dtypes, the values of Python scalars and strings, the types of
  other objects (their contents are not read);
- the *values* of tensors: the integer bit patterns of the elements, summed
  with position-dependent weights in int64 (wrapping) arithmetic, which is
  exact and independent of reduction order, so equal tensors give equal
  fingerprints on any device and thread count. Tensors with more than
  :data:`MAX_ELEMENTS` elements are read at a regular stride;
- any extra host values the caller adds (pyro_sp adds the random key of the
  call, so ranks whose global RNG states differ are caught too).

A tensor that is *meant* to differ across the ranks of a sample group — a
minibatch that each rank augments independently, the practice of the
sampling-parallelism paper — is marked with :func:`rank_local` (a
:class:`~pyro_sp.data.Augmenter` with ``independent=True`` marks its output):
its shape and dtype still must agree, its values are not compared.

The value part is computed on the tensors' device without synchronising the
host; it costs a few elementwise kernels per argument.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch

__all__ = ["MAX_ELEMENTS", "data_fingerprint", "describe_data", "flatten_data", "is_rank_local", "rank_local"]

#: Fingerprints are kept below 2**16 so that sums of squares over a sample
#: group of up to 1448 ranks stay exact in float64.
FINGERPRINT_BITS = 16
#: Elements of one tensor that are read; larger tensors are read at a stride.
MAX_ELEMENTS = 1 << 20

_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


_RANK_LOCAL = "_pyro_sp_rank_local"


def rank_local(tensor: torch.Tensor) -> torch.Tensor:
    """
    Mark ``tensor`` as intentionally different on each rank of a sample group
    (e.g. independently augmented data): the per-call agreement check then
    compares only its shape and dtype. Returns ``tensor`` itself. The mark
    belongs to this tensor object; tensors computed from it are unmarked.
    """
    setattr(tensor, _RANK_LOCAL, True)
    return tensor


def is_rank_local(value) -> bool:
    """Whether ``value`` is a tensor marked by :func:`rank_local`."""
    return isinstance(value, torch.Tensor) and getattr(value, _RANK_LOCAL, False)


def flatten_data(args: tuple, kwargs: dict) -> Iterator[tuple[str, object]]:
    """``(path, leaf)`` pairs of the arguments of a call, e.g. ``("args[0]", x)``, ``("kwargs['y']", y)``."""

    def walk(path: str, value, depth: int):
        if depth < 8 and isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                yield from walk(f"{path}[{i}]", v, depth + 1)
        elif depth < 8 and isinstance(value, dict):
            for k in sorted(value, key=repr):
                yield from walk(f"{path}[{k!r}]", value[k], depth + 1)
        else:
            yield path, value

    for i, a in enumerate(args):
        yield from walk(f"args[{i}]", a, 0)
    for k in sorted(kwargs):
        yield from walk(f"kwargs[{k!r}]", kwargs[k], 0)


def _leaf_structure(value) -> object:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype)) + (("rank-local",) if is_rank_local(value) else ())
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return ("value", repr(value))
    return ("object", type(value).__qualname__)


def _structure_hash(items) -> int:
    digest = hashlib.blake2b(repr(items).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_MIX = (_signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB))


def _mix(h: torch.Tensor) -> torch.Tensor:
    """Spread all 64 bits of an int64 tensor over its low bits (a splitmix64-style finaliser)."""
    h = torch.bitwise_xor(h, h >> 30) * _MIX[0]
    h = torch.bitwise_xor(h, h >> 27) * _MIX[1]
    return torch.bitwise_xor(h, h >> 31)


def _value_hash(t: torch.Tensor) -> torch.Tensor | None:
    """An int64 0-d tensor (on ``t``'s device) determined by ``t``'s elements, or ``None``."""
    if t.layout != torch.strided or t.is_quantized or t.numel() == 0:
        return None
    x = t.detach()
    if x.is_complex():
        x = torch.view_as_real(x)
    x = x.reshape(-1)
    if x.numel() > MAX_ELEMENTS:
        x = x[:: math.ceil(x.numel() / MAX_ELEMENTS)]
    if x.dtype == torch.bool:
        bits = x.to(torch.int64)
    elif x.is_floating_point():
        x = x + 0.0  # -0.0 and 0.0 compare equal and must hash equal
        bits = x.contiguous().view(_INT_VIEW[x.element_size()]).to(torch.int64)
    else:
        bits = x.to(torch.int64)
    weights = torch.arange(1, 2 * bits.numel(), 2, device=bits.device, dtype=torch.int64)
    return _mix(_mix((bits * weights).sum()) + bits.sum())


def data_fingerprint(args: tuple, kwargs: dict, *, extra=(), device=None) -> torch.Tensor:
    """
    The fingerprint of a call's arguments (and of ``extra``), a 0-d int64
    tensor in ``[0, 2**16)`` on ``device`` (default: the CPU). Equal arguments
    give equal fingerprints on every rank; different ones differ with
    probability :math:`1 - 2^{-16}`.

    :param tuple args: positional arguments of the call.
    :param dict kwargs: keyword arguments of the call.
    :param extra: host values that must agree too (hashed with the structure).
    :param device: where the result lives (the device of the collective).
    """
    leaves = list(flatten_data(args, kwargs))
    structure = [(path, _leaf_structure(v)) for path, v in leaves]
    total = torch.tensor(_structure_hash((structure, tuple(extra))), dtype=torch.int64, device=device)
    for i, (_, v) in enumerate(leaves):
        if isinstance(v, torch.Tensor) and not is_rank_local(v):
            h = _value_hash(v)
            if h is not None:
                total = total + h.to(total.device) * (2 * i + 7)
    return torch.remainder(_mix(total), 1 << FINGERPRINT_BITS)


def describe_data(args: tuple, kwargs: dict) -> dict[str, object]:
    """A readable, picklable summary of the arguments: per path, shape/dtype and a value hash."""
    out = {}
    for path, v in flatten_data(args, kwargs):
        if isinstance(v, torch.Tensor) and not is_rank_local(v):
            h = _value_hash(v)
            out[path] = (tuple(v.shape), str(v.dtype), None if h is None else int(h.item()) % (1 << 32))
        else:
            out[path] = _leaf_structure(v)
    return out
