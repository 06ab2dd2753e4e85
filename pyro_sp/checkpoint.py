# SPDX-License-Identifier: Apache-2.0
"""Checkpoints of a sampling-parallel run: parameters, optimizer state,
progress, and the random state of every rank.

Rank 0 writes (to a temporary file, then renamed: a crash never leaves a
half-written checkpoint); every rank reads. Resuming continues the run
exactly as if it had not stopped.
"""

from __future__ import annotations

import os

import pyro
import torch
import torch.distributed as dist

from pyro_sp.mesh import SPMesh

__all__ = ["load_checkpoint", "save_checkpoint"]

_VERSION = 1


def _local_params(elbo) -> dict:
    """Per-rank parameters of the estimator (e.g. TraceGraph's decaying baselines)."""
    if elbo is None or not hasattr(elbo, "_is_local_param"):
        return {}
    store = pyro.get_param_store()
    return {n: store[n].unconstrained().detach().clone() for n in store.keys() if elbo._is_local_param(n)}


def _rank_state(elbo, rank_objects: dict) -> dict:
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


def save_checkpoint(
    path: str,
    *,
    mesh: SPMesh,
    step: int,
    epoch: int = 0,
    optim=None,
    elbo=None,
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
    :param elbo: a distributed ELBO (its per-rank random streams).
    :param dict rank_objects: per-rank objects with ``state_dict``/``load_state_dict``
        (e.g. an :class:`~pyro_sp.data.Augmenter`).
    :param dict extra: anything else picklable, from rank 0.
    """
    mine = _rank_state(elbo, rank_objects or {})
    if mesh.is_distributed:
        ranks = [None] * mesh.world_size if mesh.rank == 0 else None
        dist.gather_object(mine, ranks, dst=0)
    else:
        ranks = [mine]
    if mesh.rank == 0:
        state = {
            "version": _VERSION,
            "mesh": (mesh.sample, mesh.data),
            "step": step,
            "epoch": epoch,
            "param_store": pyro.get_param_store().get_state(),
            "optim": None if optim is None else optim.get_state(),
            "ranks": ranks,
            "extra": extra,
        }
        tmp = f"{path}.tmp.{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, path)
    if mesh.is_distributed:
        dist.barrier()


def load_checkpoint(path: str, *, mesh: SPMesh, optim=None, elbo=None, rank_objects: dict | None = None) -> dict:
    """
    Restore a checkpoint written by :func:`save_checkpoint` on every rank.
    Parameters go to this rank's device (its CUDA device under NCCL); each
    rank gets back its own random state and per-rank parameters.

    In a loop of your own, call :func:`pyro_sp.train.prime` on the first
    batch after loading (as :func:`~pyro_sp.train.fit` does): a fresh
    autoguide or estimator draws from the global RNG when it sets itself up,
    which the uninterrupted run did before the checkpoint.

    :returns: ``{"step", "epoch", "extra"}`` of the checkpoint.
    :raises ValueError: if the mesh differs from the one that wrote it.
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("version") != _VERSION:
        raise ValueError(f"Expected a pyro_sp checkpoint of version {_VERSION}, got {state.get('version')!r} in {path}.")
    if tuple(state["mesh"]) != (mesh.sample, mesh.data):
        raise ValueError(
            f"Expected the mesh the checkpoint was written with, sample={state['mesh'][0]}, "
            f"data={state['mesh'][1]}; got sample={mesh.sample}, data={mesh.data}. Resume with "
            "the same number of ranks and the same degrees."
        )
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
    if optim is not None and state["optim"] is not None:
        optim.set_state(state["optim"])
    torch.set_rng_state(mine["torch"])
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])
    if elbo is not None and "elbo" in mine:
        elbo.load_state_dict(mine["elbo"])
    for key, obj in (rank_objects or {}).items():
        obj.load_state_dict(mine["objects"][key])
    return {"step": state["step"], "epoch": state["epoch"], "extra": state["extra"]}
