# SPDX-License-Identifier: Apache-2.0
"""The collectives of pyro_sp: broadcast of parameters and buffers, the
per-step consistency check that carries the loss, and the flattened
all-reduce of gradients.

Every helper takes the process group explicitly; with ``group=None`` it is a
no-op, so the same code runs in a plain single-process test.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = [
    "CollectiveRecord",
    "all_reduce_gradients",
    "gather_rows",
    "broadcast_tensors",
    "layout_signature",
    "record_collectives",
    "step_check",
]

#: Signatures are kept below 2**20 so that their sums and sums of squares over
#: any realistic world size are exact in float64.
_SIGNATURE_BITS = 20


@dataclass
class CollectiveRecord:
    """What :func:`record_collectives` saw: one ``(kind, bytes, seconds)`` per collective."""

    events: list[tuple[str, int, float]] = field(default_factory=list)

    def total(self, kind: str | None = None) -> tuple[int, int, float]:
        """``(count, bytes, seconds)`` of all events, or of one kind."""
        ev = [e for e in self.events if kind is None or e[0] == kind]
        return len(ev), sum(e[1] for e in ev), sum(e[2] for e in ev)


_RECORD: CollectiveRecord | None = None


@contextlib.contextmanager
def record_collectives() -> Iterator[CollectiveRecord]:
    """
    Record the collectives of the per-step path inside the block — the step
    check, the gradient all-reduce, parameter broadcasts and row gathers — with
    their payload and wall time (CUDA is synchronised around each one while
    recording, so the times are real but the overlap is lost). Costs nothing
    when not recording.
    """
    global _RECORD
    previous, _RECORD = _RECORD, CollectiveRecord()
    try:
        yield _RECORD
    finally:
        _RECORD = previous


def _run(kind: str, fn: Callable, tensor: torch.Tensor, **kwargs) -> None:
    if _RECORD is None:
        fn(tensor, **kwargs)
        return
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    start = time.perf_counter()
    fn(tensor, **kwargs)
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    _RECORD.events.append((kind, tensor.numel() * tensor.element_size(), time.perf_counter() - start))


def _buckets(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``tensors`` grouped by (dtype, device), in the given order."""
    buckets: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    return buckets


def broadcast_tensors(tensors: Sequence[torch.Tensor], *, group, src: int = 0) -> None:
    """
    Overwrite ``tensors`` in place with rank ``src``'s values: one broadcast of
    a flat buffer per (dtype, device).

    :param tensors: the same tensors, in the same order, on every rank.
    :param group: process group, or ``None`` for a no-op.
    :param int src: global rank that holds the values to keep.
    """
    if group is None or not tensors:
        return
    with torch.no_grad():
        for idx in _buckets(tensors).values():
            part = [tensors[i] for i in idx]
            flat = _flatten_dense_tensors([t.detach() for t in part])
            _run("broadcast", dist.broadcast, flat, src=src, group=group)
            for t, v in zip(part, _unflatten_dense_tensors(flat, part)):
                t.copy_(v)


def all_reduce_gradients(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    *,
    group,
    scale: float = 1.0,
) -> list[torch.Tensor | None]:
    """
    Sum ``grads`` over ``group`` and multiply by ``scale``, in one all-reduce
    of a flat buffer per (dtype, device).

    A missing gradient counts as zero; one flag per parameter rides along in
    the same buffer, so a gradient that is missing on *every* rank stays
    ``None`` (an optimizer then skips that parameter, as it would in one
    process).

    :param params: parameters in the same (name) order on every rank.
    :param grads: this rank's gradient of each parameter, or ``None``.
    :param group: process group, or ``None`` for a no-op.
    :param float scale: factor applied after the sum (e.g. ``1 / data``).
    :returns: the reduced gradients, views into the flat buffer.
    """
    if group is None:
        return list(grads)
    out: list[torch.Tensor | None] = [None] * len(params)
    for (dtype, device), idx in _buckets(params).items():
        parts, flags = [], []
        for i in idx:
            g = grads[i]
            parts.append(torch.zeros_like(params[i]) if g is None else g.detach())
            flags.append(0.0 if g is None else 1.0)
        parts.append(torch.tensor(flags, dtype=dtype, device=device))
        flat = _flatten_dense_tensors(parts)
        _run("all_reduce_gradients", dist.all_reduce, flat, group=group)
        if scale != 1.0:
            flat.mul_(scale)
        reduced = _unflatten_dense_tensors(flat, parts)
        present = reduced[-1].tolist()
        for i, g, flag in zip(idx, reduced, present):
            out[i] = g if flag != 0 else None
    return out


def gather_rows(
    tensors: Sequence[torch.Tensor],
    counts: Sequence[int],
    *,
    group,
    dst: int | None = None,
) -> list[torch.Tensor] | None:
    """
    Concatenate, along dim 0 and in group-rank order, every rank's rows of
    each tensor: rank ``i`` of ``group`` holds ``counts[i]`` rows (uneven
    counts are padded for transport and trimmed). One all-gather (or gather)
    per (dtype, device).

    :param tensors: this rank's tensors, each of shape ``(counts[i], *rest)``;
        ``rest`` and the dtypes must agree across ranks.
    :param counts: the row count of every rank of ``group``.
    :param group: process group, or ``None`` (returns ``tensors``).
    :param int dst: group rank that receives the result; ``None`` for all.
    :returns: the gathered tensors (``None`` on ranks other than ``dst``).
    """
    if group is None:
        return list(tensors)
    size = dist.get_world_size(group)
    me = dist.get_rank(group)
    if len(counts) != size:
        raise ValueError(f"Expected {size} row counts (one per rank), got {len(counts)}.")
    rows, total = max(counts), sum(counts)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for (dtype, device), idx in _buckets(tensors).items():
        transport = torch.uint8 if dtype == torch.bool else dtype
        cols = [tensors[i].reshape(counts[me], -1).to(transport) for i in idx]
        widths = [c.shape[1] for c in cols]
        flat = torch.zeros(rows, sum(widths), dtype=transport, device=device)
        flat[: counts[me]] = torch.cat(cols, dim=1)
        if dst is None:
            parts = [torch.empty_like(flat) for _ in range(size)]
            _run("all_gather_rows", lambda t, **kw: dist.all_gather(parts, t, **kw), flat, group=group)
        else:
            parts = [torch.empty_like(flat) for _ in range(size)] if me == dst else None
            root = dist.get_global_rank(group, dst)
            _run("gather_rows", lambda t, **kw: dist.gather(t, parts, dst=root, **kw), flat, group=group)
            if me != dst:
                continue
        full = torch.cat([part[:c] for part, c in zip(parts, counts)], dim=0)
        for i, piece in zip(idx, full.split(widths, dim=1)):
            out[i] = piece.reshape((total,) + tuple(tensors[i].shape[1:])).to(dtype)
    return out if dst is None or me == dst else None


def layout_signature(*items) -> int:
    """A small deterministic hash of ``items`` (their ``repr``), below 2**20."""
    digest = hashlib.blake2b(repr(items).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (1 << _SIGNATURE_BITS)


def step_check(
    local_loss: float,
    signature: int,
    error: BaseException | None,
    *,
    group,
    device: torch.device | str = "cpu",
    describe: Callable[[], object] = lambda: None,
    what: str = "The distributed ELBO",
) -> float:
    """
    The one small collective of every step: sums the ranks' partial losses and
    verifies, on every rank, that no rank failed and that all ranks agree on
    ``signature`` (number of particles, parameter names and shapes).

    It all-reduces ``[loss, s, s**2, failed]``. If every rank sees
    ``sum(s) == W s`` and ``sum(s**2) == W s**2`` then all signatures are equal;
    if they are not, every rank sees at least one of the two fail, so every
    rank raises — none is left waiting in a later collective.

    :param float local_loss: this rank's partial loss.
    :param int signature: :func:`layout_signature` of what must agree.
    :param error: the exception this rank hit in its local computation, if any.
    :param group: process group, or ``None`` (returns ``local_loss``).
    :param describe: returns a picklable description of this rank's layout,
        gathered only to explain a mismatch.
    :param str what: the computation, named in the error message.
    :returns: the sum of the partial losses over ``group``.
    :raises RuntimeError: on every rank if some rank failed.
    :raises ValueError: on every rank if the ranks disagree.
    """
    if group is None:
        if error is not None:
            raise error
        return local_loss
    s = float(signature)
    loss = 0.0 if error is not None else float(local_loss)
    t = torch.tensor([loss, s, s * s, float(error is not None)], dtype=torch.float64, device=device)
    _run("step_check", dist.all_reduce, t, group=group)
    total, s_sum, s2_sum, failures = t.tolist()
    world = dist.get_world_size(group)
    if failures:
        messages: list = [None] * world
        mine = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(messages, mine, group=group)
        failed = {r: m for r, m in enumerate(messages) if m is not None}
        text = "; ".join(f"rank {r}: {m}" for r, m in failed.items())
        raise RuntimeError(
            f"{what} failed on {len(failed)} of {world} ranks ({text}). "
            "Every rank stops with this error. If the failure is a shape error, check that "
            "the model and guide broadcast over a leftmost particle dimension "
            "(vectorize_particles=True needs static, vectorizable structure)."
        ) from error
    if s_sum != world * s or s2_sum != world * s * s:
        layouts: list = [None] * world
        dist.all_gather_object(layouts, describe(), group=group)
        raise ValueError(_explain_mismatch(layouts))
    return total


def _explain_mismatch(layouts: list) -> str:
    ref = layouts[0]
    lines = [
        "Expected every rank to run the same estimator on the same parameters, but the "
        "ranks disagree:"
    ]
    for rank, layout in enumerate(layouts[1:], start=1):
        if layout == ref:
            continue
        if not (isinstance(layout, dict) and isinstance(ref, dict)):
            lines.append(f"  rank {rank}: {layout!r} vs rank 0: {ref!r}")
            continue
        for key in sorted(set(ref) | set(layout), key=str):
            a, b = ref.get(key), layout.get(key)
            if a == b:
                continue
            if isinstance(a, dict) and isinstance(b, dict):
                only0 = sorted(set(a) - set(b))
                only_r = sorted(set(b) - set(a))
                shapes = {k: (a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k]}
                if only0:
                    lines.append(f"  {key}: only on rank 0: {only0} (missing on rank {rank})")
                if only_r:
                    lines.append(f"  {key}: only on rank {rank}: {only_r}")
                for k, (x, y) in shapes.items():
                    lines.append(f"  {key}[{k!r}]: rank 0 has {x}, rank {rank} has {y}")
            else:
                lines.append(f"  {key}: rank 0 has {a!r}, rank {rank} has {b!r}")
    lines.append(
        "Make num_particles, the mesh and the model/guide structure the same on every rank."
    )
    return "\n".join(lines)
