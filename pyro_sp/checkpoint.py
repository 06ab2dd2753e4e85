# SPDX-License-Identifier: Apache-2.0
"""Checkpoints of a sampling-parallel run: parameters, optimizer state,
progress, and the random state of every rank.

Rank 0 writes; every rank reads. A checkpoint cannot be silently wrong:

- **Integrity.** The file is one header line, ``pyro_sp checkpoint v2
  sha256=<digest> bytes=<n>``, followed by the ``torch.save`` payload of
  ``n`` bytes. :func:`load_checkpoint` checks the length and the SHA-256 of
  the payload before it unpickles anything, so a flipped byte, a truncated
  or an empty file is an error, never a resumed run from a corrupted state.
- **Atomic writes.** The payload goes to ``<path>.tmp.<pid>``, is flushed to
  the disk (``fsync``) and renamed over ``<path>``: a crash during the write
  leaves the previous checkpoint intact. A temporary file left by a writer
  that was killed is removed by the next :func:`save_checkpoint`.
- **No rank left waiting.** Whether rank 0 wrote the file and whether every
  rank read it is agreed in one small collective
  (:func:`~pyro_sp.distributed.guard.guarded`): a failure on one rank (a full
  disk on rank 0, a file another node cannot see) is an error on every rank.

Resuming continues the run exactly as if it had not stopped.

**One protocol.** Everything a checkpoint holds is saved through
``state_dict()`` and restored through ``load_state_dict(state)``: the objects
that are the same on every rank (``objects=``: a ``MeanFieldVI``, a
``torch.optim`` optimizer, a ``pyro.optim`` optimizer given as ``optim=``,
written by rank 0) and the per-rank ones (``rank_objects=``: an
:class:`~pyro_sp.data.Augmenter`, the estimator given as ``elbo=``; every
rank's own). Pyro's param store and every rank's global random state are
always saved. :func:`~pyro_sp.train.fit` drives either training path with it.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re

import pyro
import torch
import torch.distributed as dist

from pyro_sp.distributed.guard import guarded
from pyro_sp.distributed.mesh import SPMesh

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

_VERSION = 2
_HEADER = re.compile(rb"pyro_sp checkpoint v(\d+) sha256=([0-9a-f]{64}) bytes=(\d+)\n")
_MAGIC = b"pyro_sp checkpoint v"
#: What to do about a checkpoint that cannot be used.
_FIX = "Point to an intact copy, or move the file away to start the run from scratch."


class CheckpointError(ValueError):
    """
    A checkpoint that cannot be resumed from.

    :param str path: the file.
    :param str fault: what is wrong: ``"missing"``, ``"empty"``,
        ``"not a checkpoint"``, ``"truncated"``, ``"length"``, ``"checksum"``,
        ``"unreadable"``, ``"version"``, ``"mesh"`` or ``"objects"``.
    :param str detail: the sentence that explains it.
    :param str fix: what to do (default: restore a copy or start afresh).
    """

    def __init__(self, path: str, fault: str, detail: str, fix: str = _FIX) -> None:
        self.path, self.fault = path, fault
        super().__init__(f"Cannot resume from the checkpoint {path!r}: {detail} {fix}")


class _PyroOptimState:
    """A :class:`pyro.optim.PyroOptim` seen through the one protocol (its ``get_state``/``set_state``)."""

    def __init__(self, optim) -> None:
        self.optim = optim

    def state_dict(self) -> dict:
        return self.optim.get_state()

    def load_state_dict(self, state: dict) -> None:
        self.optim.set_state(state)


def _shared_objects(optim, objects: dict | None) -> dict:
    """The objects saved once, from rank 0, by name (``optim`` under ``"optim"``)."""
    out = dict(objects or {})
    if optim is not None:
        if "optim" in out:
            raise ValueError("Expected the Pyro optimizer either as optim= or in objects=, got both.")
        out["optim"] = _PyroOptimState(optim)
    for name, obj in out.items():
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise TypeError(
                f"Expected objects[{name!r}] to have state_dict() and load_state_dict(), got "
                f"{type(obj).__name__}. Save it under extra=, or give it the two methods."
            )
    return out


def _local_params(elbo) -> dict:
    """Per-rank parameters of the estimator (e.g. TraceGraph's decaying baselines)."""
    if elbo is None or not hasattr(elbo, "_is_local_param"):
        return {}
    store = pyro.get_param_store()
    return {n: store[n].unconstrained().detach().clone() for n in store.keys() if elbo._is_local_param(n)}


def _rank_state(elbo, rank_objects: dict) -> dict:
    """This rank's part: its global random state, per-rank objects and parameters."""
    state = {
        "torch": torch.get_rng_state(),
        "objects": {k: v.state_dict() for k, v in rank_objects.items()},
        "local_params": _local_params(elbo),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if elbo is not None:
        state["elbo"] = elbo.state_dict()
    return state


def _remove_stale_temporaries(path: str) -> None:
    """Delete ``<path>.tmp.<pid>`` files left by writers that were killed mid-write."""
    mine = f"{path}.tmp.{os.getpid()}"
    for stale in glob.glob(glob.escape(path) + ".tmp.*"):
        if stale != mine:
            try:
                os.remove(stale)
            except FileNotFoundError:  # removed meanwhile
                pass


def _write(path: str, payload: bytes) -> None:
    """Header and payload to a temporary file, synced, then renamed over ``path``."""
    digest = hashlib.sha256(payload).hexdigest()
    header = f"pyro_sp checkpoint v{_VERSION} sha256={digest} bytes={len(payload)}\n".encode()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a file system that does not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read(path: str) -> dict:
    """The verified state of a checkpoint file, or :class:`CheckpointError` saying what is wrong."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(path, "missing", "the file does not exist.",
                              "Check the path (every rank must see the same file, e.g. on a shared file system).") from None
    except OSError as e:
        raise CheckpointError(path, "unreadable", f"it cannot be read ({e}).", "Check its permissions and the file system.") from e
    if not data:
        raise CheckpointError(path, "empty", "the file is empty (0 bytes), e.g. a copy or a write that was cut off at once.")
    end = data.find(b"\n", 0, 200)
    match = _HEADER.fullmatch(data[: end + 1]) if end >= 0 else None
    if match is None:
        if data.startswith(_MAGIC):
            raise CheckpointError(path, "truncated", f"its header is cut off or garbled ({len(data)} bytes in all).")
        raise CheckpointError(
            path, "not a checkpoint",
            f"it does not start with the pyro_sp checkpoint header (found {data[:20]!r}); it was not "
            "written by pyro_sp.save_checkpoint of this version.",
        )
    version, digest, size = int(match.group(1)), match.group(2).decode(), int(match.group(3))
    if version != _VERSION:
        raise CheckpointError(
            path, "version", f"it has format version {version}; this pyro_sp reads version {_VERSION}.",
            "Resume with the pyro_sp version that wrote it, or start afresh.",
        )
    payload = data[end + 1 :]
    if len(payload) != size:
        fault, what = ("truncated", "cut short") if len(payload) < size else ("length", "longer than written")
        raise CheckpointError(
            path, fault, f"it is {what}: its payload has {len(payload)} of the {size} bytes its header records "
            "(an interrupted copy, a full disk).",
        )
    actual = hashlib.sha256(payload).hexdigest()
    if actual != digest:
        raise CheckpointError(
            path, "checksum",
            f"its content does not match the SHA-256 checksum it was written with (recorded {digest[:12]}…, "
            f"found {actual[:12]}…): the file changed after it was written (a bad disk or copy). Resuming "
            "from it would continue from corrupted values.",
        )
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - intact bytes that this torch cannot unpickle
        raise CheckpointError(
            path, "unreadable", f"its bytes are intact but torch.load cannot read them ({type(e).__name__}: {e}).",
            "Resume with the torch and pyro versions that wrote it.",
        ) from e


def save_checkpoint(
    path: str,
    *,
    mesh: SPMesh,
    step: int,
    epoch: int = 0,
    optim=None,
    elbo=None,
    objects: dict | None = None,
    rank_objects: dict | None = None,
    extra: dict | None = None,
) -> None:
    """
    Write a checkpoint (collective: every rank calls it).

    :param str path: file written by rank 0.
    :param SPMesh mesh: the process grid (stored and checked on load).
    :param int step: global step count.
    :param int epoch: epoch count.
    :param optim: a :class:`pyro.optim.PyroOptim` (its per-parameter state).
    :param elbo: a distributed ELBO (its per-rank state).
    :param dict objects: objects equal on every rank, with ``state_dict`` /
        ``load_state_dict`` (a ``MeanFieldVI``, a ``torch.optim`` optimizer), by name.
    :param dict rank_objects: per-rank objects with ``state_dict``/``load_state_dict``
        (e.g. an :class:`~pyro_sp.data.Augmenter`).
    :param dict extra: anything else picklable, from rank 0.
    :raises OSError: on rank 0 if it cannot write the file (and
        :class:`~pyro_sp.RankError` naming that error on the other ranks).
    """
    shared = _shared_objects(optim, objects)
    mine = _rank_state(elbo, rank_objects or {})
    if mesh.is_distributed:
        ranks = [None] * mesh.world_size if mesh.rank == 0 else None
        dist.gather_object(mine, ranks, dst=0)
    else:
        ranks = [mine]

    def write() -> None:
        if mesh.rank != 0:
            return
        state = {
            "version": _VERSION,
            "mesh": (mesh.sample, mesh.data),
            "step": step,
            "epoch": epoch,
            "param_store": pyro.get_param_store().get_state(),
            "objects": {name: obj.state_dict() for name, obj in shared.items()},
            "ranks": ranks,
            "extra": extra,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        _write(path, buffer.getvalue())

    group = dist.group.WORLD if mesh.is_distributed else None
    guarded(write, group=group, what=f"save_checkpoint({path!r})", device=mesh.device,
            hint="No checkpoint was written at this step.")


def load_checkpoint(
    path: str,
    *,
    mesh: SPMesh,
    optim=None,
    elbo=None,
    objects: dict | None = None,
    rank_objects: dict | None = None,
) -> dict:
    """
    Restore a checkpoint written by :func:`save_checkpoint` on every rank
    (collective). Parameters go to this rank's device (its CUDA device under
    NCCL); each rank gets back its own random state and per-rank parameters.

    The file's length and SHA-256 are verified first. If any rank cannot use
    the file, every rank raises and none has changed its state.

    In a loop of your own, call :func:`pyro_sp.train.prime` on the first
    batch after loading (as :func:`~pyro_sp.train.fit` does): a fresh
    autoguide or estimator draws from the global RNG when it sets itself up,
    which the uninterrupted run did before the checkpoint.

    :param objects: the objects given to :func:`save_checkpoint` as ``objects=``
        (by the same names); each gets its ``load_state_dict``.
    :param optim, elbo, rank_objects: as in :func:`save_checkpoint`.
    :returns: ``{"step", "epoch", "extra"}`` of the checkpoint.
    :raises CheckpointError: on a rank that cannot use the file: missing,
        empty, truncated, corrupted (checksum), unreadable, of another format
        version or written by another mesh; the message names the file, the
        fault and the fix (:class:`~pyro_sp.RankError` on the other ranks).
    """
    shared = _shared_objects(optim, objects)
    def read() -> dict:
        state = _read(path)
        missing = sorted(set(shared) - set(state.get("objects", {})))
        if missing:
            raise CheckpointError(
                path, "objects", f"it holds no state for {missing} (it has {sorted(state.get('objects', {}))}).",
                "Resume with the objects the run that wrote it saved.",
            )
        if tuple(state["mesh"]) != (mesh.sample, mesh.data):
            s, d = state["mesh"]
            raise CheckpointError(
                path, "mesh",
                f"it was written by a mesh of sample={s}, data={d} ({s * d} ranks); this run has "
                f"sample={mesh.sample}, data={mesh.data} ({mesh.world_size} ranks).",
                "Resume with the same number of ranks and the same degrees.",
            )
        return state

    group = dist.group.WORLD if mesh.is_distributed else None
    state, _ = guarded(read, group=group, what=f"load_checkpoint({path!r})", device=mesh.device,
                       hint="No rank resumed.")
    params = state["param_store"]
    mine = state["ranks"][mesh.rank]
    values = dict(params["params"])
    values.update(mine.get("local_params", {}))  # this rank's own per-rank parameters
    device = mesh.device
    pyro.get_param_store().set_state(
        {
            "params": {n: v.detach().to(device).clone().requires_grad_() for n, v in values.items()},
            "constraints": dict(params["constraints"]),
        }
    )
    for name, obj in shared.items():
        obj.load_state_dict(state["objects"][name])
    torch.set_rng_state(mine["torch"])
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])
    if elbo is not None and "elbo" in mine:
        elbo.load_state_dict(mine["elbo"])
    for key, obj in (rank_objects or {}).items():
        obj.load_state_dict(mine["objects"][key])
    return {"step": state["step"], "epoch": state["epoch"], "extra": state["extra"]}
