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
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from pyro_sp.errors import RankError

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

    Rank ``src`` writes nothing, and the others write through ``.data``: no
    version counter moves, so autograd graphs that the caller built from these
    tensors before stay usable (on ``src`` they are exactly as they were).

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
            if dist.get_rank() == src:
                continue
            for t, v in zip(part, _unflatten_dense_tensors(flat, part)):
                t.data.copy_(v)


def all_reduce_gradients(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    *,
    group,
    scale: float = 1.0,
    error: BaseException | None = None,
    what: str = "The gradient all-reduce",
    hint: str = "",
) -> list[torch.Tensor | None]:
    """
    Sum ``grads`` over ``group`` and multiply by ``scale``, in one all-reduce
    of a flat buffer per (dtype, device).

    A missing gradient counts as zero; one flag per parameter rides along in
    the same buffer, so a gradient that is missing on *every* rank stays
    ``None`` (an optimizer then skips that parameter, as it would in one
    process). One more flag says whether a rank failed since the last check
    (``error``, e.g. in its backward pass): such a rank still joins the
    reduction (with zeros), and then every rank raises as in
    :func:`step_check`, so no rank waits for the collective timeout.

    :param params: parameters in the same (name) order on every rank.
    :param grads: this rank's gradient of each parameter, or ``None``.
    :param group: process group, or ``None`` for a no-op.
    :param float scale: factor applied after the sum (e.g. ``1 / data``).
    :param error: this rank's failure since the last check, or ``None``
        (its ``grads`` are then ignored).
    :param str what: the computation, named in the error.
    :param str hint: a sentence added to :class:`~pyro_sp.RankError`.
    :returns: the reduced gradients, views into the flat buffer.
    :raises RankError: on the ranks that did not fail, if some rank failed
        (the failing ranks re-raise their own exception).
    """
    if group is None:
        if error is not None:
            raise error
        return list(grads)
    if error is not None:
        if not params:  # the ranks agree on the parameters: with none, no rank waits for this one
            raise error
        grads = [None] * len(params)
    out: list[torch.Tensor | None] = [None] * len(params)
    failed = 0.0
    for k, ((dtype, device), idx) in enumerate(_buckets(params).items()):
        parts, flags = [], []
        for i in idx:
            g = grads[i]
            parts.append(torch.zeros_like(params[i]) if g is None else g.detach())
            flags.append(0.0 if g is None else 1.0)
        if k == 0:  # the failure flag rides in the first buffer
            flags.append(float(error is not None))
        parts.append(torch.tensor(flags, dtype=dtype, device=device))
        flat = _flatten_dense_tensors(parts)
        _run("all_reduce_gradients", dist.all_reduce, flat, group=group)
        if scale != 1.0:
            flat.mul_(scale)
        reduced = _unflatten_dense_tensors(flat, parts)
        present = reduced[-1].tolist()
        if k == 0:
            failed = present.pop()
        for i, g, flag in zip(idx, reduced, present):
            out[i] = g if flag != 0 else None
    if failed:
        raise_failure(error, what, hint, group, dist.get_world_size(group))
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
        cols = [
            tensors[i].reshape(counts[me], math.prod(tensors[i].shape[1:])).to(transport) for i in idx
        ]
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
    hint: str = "",
    agree: torch.Tensor | None = None,
    agree_slot: int = 0,
    agree_slots: int = 1,
    describe_agree: Callable[[], object] = lambda: None,
) -> float:
    """
    The one small collective of every step: sums the ranks' partial losses and
    verifies, on every rank, that no rank failed, that all ranks agree on
    ``signature`` (number of particles, parameter names and shapes) and that
    the ranks of each *slot* (a sample group) agree on ``agree`` (the
    fingerprint of the call's data and random key).

    It all-reduces ``[loss, s, s**2, failed, a_0, a_0**2, ..., a_{K-1}, a_{K-1}**2]``
    where rank ``r`` writes its fingerprint ``a`` into its own slot. If every
    rank sees ``sum(s) == W s`` and ``sum(s**2) == W s**2`` then all
    signatures are equal; if they are not, every rank sees at least one of the
    two fail. Within a slot of ``n`` ranks, the fingerprints are all equal iff
    ``n * sum(a**2) == sum(a)**2``, which every rank can evaluate for every
    slot. So every rank raises, or none does — none is left waiting in a later
    collective.

    If some rank failed, a rank that failed re-raises its own exception (type,
    message and traceback kept; the other ranks' failures are added as a
    note) and a rank that did not fail raises :class:`~pyro_sp.RankError`
    naming the failing ranks and their exceptions.

    :param float local_loss: this rank's partial loss.
    :param int signature: :func:`layout_signature` of what must agree.
    :param error: the exception this rank hit in its local computation, if any.
    :param group: process group, or ``None`` (returns ``local_loss``).
    :param describe: returns a picklable description of this rank's layout,
        gathered only to explain a mismatch.
    :param str what: the computation, named in the error message.
    :param str hint: a sentence added to :class:`~pyro_sp.RankError`.
    :param agree: 0-d integer tensor in ``[0, 2**16)`` that must be equal on the
        ranks of a slot (see :func:`pyro_sp.fingerprint.data_fingerprint`), or ``None``.
    :param int agree_slot: this rank's slot (its data-axis coordinate).
    :param int agree_slots: number of slots; every slot holds the same number of ranks.
    :param describe_agree: returns a picklable description of what ``agree``
        condenses, gathered only to explain a mismatch.
    :returns: the sum of the partial losses over ``group``.
    :raises RankError: on the ranks that did not fail, if some rank failed.
    :raises ValueError: on every rank if the ranks disagree.
    """
    if group is None:
        if error is not None:
            raise error
        return local_loss
    s = float(signature)
    loss = 0.0 if error is not None else float(local_loss)
    slots = agree_slots if agree is not None else 0
    t = torch.zeros(4 + 2 * slots, dtype=torch.float64, device=device)
    t[:4] = torch.tensor([loss, s, s * s, float(error is not None)], dtype=torch.float64)
    if slots:
        a = agree.to(device=device, dtype=torch.float64)
        t[4 + 2 * agree_slot] = a
        t[5 + 2 * agree_slot] = a * a
    _run("step_check", dist.all_reduce, t, group=group)
    values = t.tolist()
    total, s_sum, s2_sum, failures = values[:4]
    world = dist.get_world_size(group)
    if failures:
        raise_failure(error, what, hint, group, world)
    if s_sum != world * s or s2_sum != world * s * s:
        layouts: list = [None] * world
        dist.all_gather_object(layouts, describe(), group=group)
        raise ValueError(_explain_mismatch(layouts))
    per_slot = world // slots if slots else 0
    bad = [k for k in range(slots) if per_slot * values[5 + 2 * k] != values[4 + 2 * k] ** 2]
    if bad:
        descriptions: list = [None] * world
        dist.all_gather_object(descriptions, (agree_slot, describe_agree()), group=group)
        raise ValueError(_explain_disagreement(descriptions, bad, what))
    return total


def raise_failure(error, what, hint, group, world) -> None:
    """
    Raise, on every rank of ``group`` (a collective), the failure that a
    check found: a rank that failed re-raises its own ``error`` with a note
    naming the other failures, a rank that did not (``error is None``) raises
    :class:`~pyro_sp.RankError` naming them.
    """
    messages: list = [None] * world
    mine = None if error is None else (type(error).__name__, str(error))
    dist.all_gather_object(messages, mine, group=group)
    failed = {r: m for r, m in enumerate(messages) if m is not None}
    if error is None:
        raise RankError(what, failed, world, hint)
    me = dist.get_rank(group)
    others = {r: m for r, m in failed.items() if r != me}
    add_note = getattr(error, "add_note", None)  # Python >= 3.11: shown with the traceback
    if add_note is not None:
        note = f"[pyro_sp] raised on rank {me} in {what}"
        if others:
            note += "; it also failed on " + "; ".join(
                f"rank {r} ({t}: {m})" for r, (t, m) in sorted(others.items())
            )
        add_note(note + (f". {hint}" if hint else "."))
    raise error


def _explain_disagreement(descriptions: list, bad: list[int], what: str) -> str:
    lines = [
        f"Expected the ranks of each sample group to call {what} with the same data and the "
        "same random state (they split the particles of one estimate), but they differ:"
    ]
    groups: dict[int, list[tuple[int, dict]]] = {}
    for rank, (slot, desc) in enumerate(descriptions):
        groups.setdefault(slot, []).append((rank, desc if isinstance(desc, dict) else {}))
    for slot in bad:
        members = groups.get(slot, [])
        if not members:
            continue
        (r0, ref), rest = members[0], members[1:]
        for r, desc in rest:
            keys = sorted(set(ref) | set(desc), key=str)
            for key in keys:
                a, b = ref.get(key, "<missing>"), desc.get(key, "<missing>")
                if a != b:
                    lines.append(f"  data group {slot}: {key}: rank {r0} has {a}, rank {r} has {b}")
    lines.append(
        "Give every rank of a sample group the same arguments (e.g. build data from a seeded "
        "generator, or read minibatches with pyro_sp.data, which shards by data group), and seed "
        "the global RNG identically on those ranks (pyro.set_rng_seed(s) with the same s; add the "
        "data-axis index, never the global rank, if data groups should differ)."
    )
    return "\n".join(lines)


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
