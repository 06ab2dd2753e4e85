# SPDX-License-Identifier: Apache-2.0
"""Starting and ending the distributed part of a job.

- :func:`init_mesh`: the process group from torchrun's environment, through
  the store of this launch attempt, and the :class:`~pyro_sp.SPMesh` over it;
- :func:`launch_module`: ``torchrun --standalone`` of a module from inside a
  process (``pyro-sp demo``, ``pyro-sp bench``, the benchmarks' launches);
- :func:`start_module`: a module in a subprocess, alone or under
  :func:`launch_module` there (launches that run side by side: ``pyro-sp bench``);
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

from pyro_sp.distributed.failure import check_not_aborted, start_watchdog
from pyro_sp.distributed.mesh import SPMesh

__all__ = ["DEFAULT_TIMEOUT", "init_mesh", "launch_module", "start_module"]

#: Default timeout of every collective: a rank that stops answering turns into
#: an error on the others after this long instead of a hang.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

def _in_torchrun() -> bool:
    return all(v in os.environ for v in _TORCHRUN_VARS)


def _attempt_store(timeout: datetime.timedelta):
    """
    The rendezvous store of this launch attempt. Under ``torchrun
    --max-restarts`` the agent's store outlives a failed attempt, and a
    restarted rank could read a dead peer's address left from the previous
    attempt (then fail with "Connection refused"); keys are therefore
    prefixed with the attempt number.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=not agent_store and rank == 0,
        timeout=timeout,
        multi_tenant=not agent_store,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"pyro_sp/attempt_{attempt}", store), rank, world


def init_mesh(
    sample: int | None = None,
    data: int | None = None,
    *,
    backend: str | None = None,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
) -> SPMesh:
    """
    Initialise the default process group from the torchrun environment (if
    not already done) and return the :class:`SPMesh` over it.

    Outside torchrun, with no process group, returns the single-process mesh.
    Give ``sample``, ``data``, both or neither (then every rank is on the
    sample axis); the missing degree is ``world_size // given``.

    :param int sample: size of the sample axis.
    :param int data: size of the data axis.
    :param str backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is
        available, else gloo.
    :param datetime.timedelta timeout: timeout of every collective.
    """
    check_not_aborted()
    if not dist.is_initialized() and _in_torchrun():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        store, rank, world = _attempt_store(timeout)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
    if dist.is_initialized() and dist.get_backend() == "nccl":
        start_watchdog()  # a rank waiting on the GPU is not woken by a peer's abort (pyro_sp.distributed.failure)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if sample is None and data is None:
        sample = world
    for name, given in (("sample", sample), ("data", data)):
        if given is not None and (not isinstance(given, int) or given < 1 or world % given):
            raise ValueError(
                f"Expected {name} to be a positive divisor of the world size {world}, got "
                f"sample={sample}, data={data}. Launch a multiple of {given} ranks or "
                f"change {name}."
            )
    if sample is None:
        sample = world // data
    if data is None:
        data = world // sample
    return SPMesh(sample=sample, data=data)


def launch_module(module: str, args: list[str], nproc: int, prog: str = "pyro-sp") -> int:
    """``python -m torch.distributed.run --standalone --nproc-per-node nproc -m module *args``,
    in this process, with ``args`` kept out of the launcher's option parser (which would
    take an option such as ``--start`` for its ``--start-method``). Returns the exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launcher = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", module, "placeholder"]
    )
    launcher.training_script_args = list(args)
    try:
        run(launcher)
    except ChildFailedError as e:
        failures = "; ".join(f"rank {r}: exit code {f.exitcode}" for r, f in sorted(e.failures.items()))
        print(f"{prog}: a rank failed ({failures}); see its error above.", file=sys.stderr)
        return 1
    return 0


def start_module(module: str, args: list[str], *, nproc: int | None = None, prog: str = "pyro-sp", **popen):
    """
    Start ``python -m module *args`` in a subprocess and return its :class:`subprocess.Popen`
    without waiting: one plain process when ``nproc`` is ``None``, else ``nproc`` ranks
    launched by :func:`launch_module` inside that subprocess (so every torchrun launch of
    pyro_sp goes through :func:`launch_module`). Several can run at the same time.

    :param str module: the module to run.
    :param list args: its arguments.
    :param int nproc: ranks to launch under torchrun, or ``None`` for one plain process.
    :param str prog: the name :func:`launch_module` gives in its error message.
    :param popen: keyword arguments of :class:`subprocess.Popen` (``env``, ``stdout``, ...).
    """
    import subprocess

    if nproc is None:
        cmd = [sys.executable, "-m", module, *args]
    else:
        launch = ("import sys; from pyro_sp.distributed.launch import launch_module; "
                  "sys.exit(launch_module(sys.argv[1], sys.argv[4:], int(sys.argv[2]), prog=sys.argv[3]))")
        cmd = [sys.executable, "-c", launch, module, str(nproc), prog, *args]
    return subprocess.Popen(cmd, **popen)
