# SPDX-License-Identifier: Apache-2.0
"""The guard of every distributed computation: run locally, agree, raise the
same failure everywhere.

A distributed computation in pyro_sp runs locally on every rank, then agrees
in one collective (:func:`step_check`) on whether every rank succeeded, on
the layout (a :func:`layout_signature`) and, per sample group, on the data.
:func:`guarded` is that pattern as one call, used by every path (the
estimators, ``MeanFieldVI``, ``DistributedPredictive``, checkpoints). If some
rank failed:

- a rank that failed re-raises its **own** exception (same type, message and
  traceback), so code that catches ``ValueError`` or ``NotImplementedError``
  works as it does with Pyro; when every rank fails with the same type, every
  rank raises that type;
- a rank that did not fail raises :class:`RankError`, which names the failing
  ranks and their exception types and messages.

No rank is left waiting in a later collective. Failures where no collective
can carry the news (the others already wait in one) are
:mod:`pyro_sp.distributed.failure`'s.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from pyro_sp.distributed.record import recorded

__all__ = ["Agreement", "RankError", "guarded", "layout_signature", "raise_failure", "step_check"]

#: Signatures are kept below 2**20 so that their sums and sums of squares over
#: any realistic world size are exact in float64.
_SIGNATURE_BITS = 20

T = TypeVar("T")


@dataclass(frozen=True)
class Agreement:
    """
    What the ranks of each *slot* (a sample group) must agree on in a check:
    a fingerprint of the call's data and random key.

    :param fingerprint: 0-d integer tensor in ``[0, 2**16)`` that must be equal on
        the ranks of a slot (see :func:`pyro_sp.distributed.fingerprint.data_fingerprint`).
    :param int slot: this rank's slot (its data-axis coordinate).
    :param int slots: number of slots; every slot holds the same number of ranks.
    :param describe: returns a picklable description of what ``fingerprint``
        condenses, gathered only to explain a mismatch.
    :param int label: the data group this rank's slot is, as named in the
        message (default: ``slot``; a check over one sample group's own process
        group has one slot, which is data group ``mesh.data_index``).
    """

    fingerprint: torch.Tensor
    slot: int = 0
    slots: int = 1
    describe: Callable[[], object] = lambda: None
    label: int | None = None


class RankError(RuntimeError):
    """
    Another rank failed in a distributed computation that this rank completed.

    :param str what: the computation (e.g. ``"DistributedTrace_ELBO.loss"``).
    :param dict failures: ``{rank: (exception type name, message)}`` of every
        rank that failed.
    :param int world: number of ranks taking part.
    :param str hint: an optional sentence on the likely fix.
    """

    def __init__(self, what: str, failures: dict[int, tuple[str, str]], world: int, hint: str = "") -> None:
        self.what = what
        self.failures = dict(failures)
        self.world = world
        text = "; ".join(f"rank {r}: {t}: {m}" for r, (t, m) in sorted(self.failures.items()))
        ranks = sorted(self.failures)
        message = (
            f"{what} failed on {len(ranks)} of {world} ranks ({text}). This rank completed its "
            f"part but stops too; the original exception is raised on rank"
            f"{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}."
        )
        super().__init__(message + (f" {hint}" if hint else ""))

    @property
    def ranks(self) -> list[int]:
        """The ranks that failed."""
        return sorted(self.failures)

    @property
    def types(self) -> set[str]:
        """Names of the exception types raised on the failing ranks."""
        return {t for t, _ in self.failures.values()}


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
    agree: Agreement | None = None,
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
    :param Agreement agree: what the ranks of each slot must agree on, or ``None``.
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
    slots = agree.slots if agree is not None else 0
    t = torch.zeros(4 + 2 * slots, dtype=torch.float64, device=device)
    t[:4] = torch.tensor([loss, s, s * s, float(error is not None)], dtype=torch.float64)
    if slots:
        a = agree.fingerprint.to(device=device, dtype=torch.float64)
        t[4 + 2 * agree.slot] = a
        t[5 + 2 * agree.slot] = a * a
    recorded("step_check", dist.all_reduce, t, group=group)
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
        label = agree.slot if agree.label is None else agree.label
        mine = (agree.slot, label, dist.get_rank(), agree.describe())  # the global rank, whatever the group
        dist.all_gather_object(descriptions, mine, group=group)
        raise ValueError(_explain_disagreement(descriptions, bad, what))
    return total


def guarded(
    fn: Callable[[], T],
    *,
    group,
    what: str,
    device: torch.device | str = "cpu",
    value: Callable[[T], float] | None = None,
    layout: Callable[[T | None], object] | None = None,
    hint: str = "",
    agree: Agreement | None = None,
) -> tuple[T | None, float]:
    """
    Run ``fn()`` on this rank, then agree with every rank of ``group`` in one
    :func:`step_check`: the one helper for "run locally, agree, raise the
    same error everywhere" of every path.

    :param fn: this rank's local computation.
    :param group: process group, or ``None``: ``fn()`` runs and raises as usual.
    :param str what: the computation, named in errors.
    :param value: this rank's partial value from ``fn``'s result, summed over
        the ranks (default: nothing to sum).
    :param layout: what must be equal on every rank, from ``fn``'s result
        (``None`` when ``fn`` failed); compared through its
        :func:`layout_signature` and printed key by key when it differs.
    :param Agreement agree: what each sample group must agree on (see :func:`step_check`).
    :returns: ``(fn's result, the sum of value over the ranks)``; the result
        is ``None`` on no rank, since a failure raises everywhere.
    :raises RankError: on the ranks that did not fail, if some rank failed
        (the failing ranks re-raise their own exception).
    :raises ValueError: on every rank if the layouts or the agreed data differ.
    """
    error, result = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - raised on every rank by the check
        if group is None:
            raise
        error = e
    local = 0.0 if error is not None or value is None else float(value(result))
    shape = None if layout is None else layout(result)
    total = step_check(
        local, 0 if layout is None else layout_signature(shape), error, group=group, device=device,
        describe=lambda: shape, what=what, hint=hint, agree=agree,
    )
    return result, total


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
    groups: dict[int, list[tuple[int, int, dict]]] = {}
    for slot, label, rank, desc in descriptions:
        groups.setdefault(slot, []).append((label, rank, desc if isinstance(desc, dict) else {}))
    for slot in bad:
        members = groups.get(slot, [])
        if not members:
            continue
        (label, r0, ref), rest = members[0], members[1:]
        for _, r, desc in rest:
            keys = sorted(set(ref) | set(desc), key=str)
            for key in keys:
                a, b = ref.get(key, "<missing>"), desc.get(key, "<missing>")
                if a != b:
                    lines.append(f"  data group {label}: {key}: rank {r0} has {a}, rank {r} has {b}")
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

