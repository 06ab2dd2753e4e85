# SPDX-License-Identifier: Apache-2.0
"""What every tutorial shares: its settings, rank-0 printing, results and figures.

Settings come from environment variables, so a tutorial runs the same as a
script, under ``torchrun`` and as a notebook (jupytext):

- ``PYRO_SP_TUTORIAL_SMOKE=1``: a tiny setting (seconds), used by the tests;
- ``PYRO_SP_TUTORIAL_SEED``: the seed given to ``pyro.set_rng_seed`` on every rank (default 0);
- ``PYRO_SP_TUTORIAL_OUT``: where results (``<name>.json``) and figures go
  (default ``tutorials/figures``);
- ``PYRO_SP_TUTORIAL_MESH``: ``SAMPLExDATA`` (e.g. ``1x2``), the grid of the
  tutorials that take one (default: every rank on the sample axis).
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as tdist

SMOKE = os.environ.get("PYRO_SP_TUTORIAL_SMOKE", "0") == "1"
SEED = int(os.environ.get("PYRO_SP_TUTORIAL_SEED", "0"))
OUT = os.environ.get("PYRO_SP_TUTORIAL_OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")


_shape: dict = {}  # the grid a tutorial asked for through mesh_shape(), for report()


def mesh_shape() -> dict:
    """``init_mesh`` keywords from ``PYRO_SP_TUTORIAL_MESH`` (``{}``: every rank on the sample axis)."""
    text = os.environ.get("PYRO_SP_TUTORIAL_MESH", "").strip()
    if not text:
        return {}
    try:
        sample, data = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"Expected PYRO_SP_TUTORIAL_MESH=SAMPLExDATA such as 2x1 or 1x2, got {text!r}.") from None
    _shape.update(sample=sample, data=data)
    return dict(_shape)


def steps(full: int, smoke: int) -> int:
    """The number of steps (or epochs, samples, ...) of this run."""
    return smoke if SMOKE else full


def is_main() -> bool:
    return not tdist.is_initialized() or tdist.get_rank() == 0


def say(*args, **kwargs) -> None:
    """``print`` on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


class Clock:
    """Wall time since construction, in seconds."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def report(name: str, *, compact: bool = False, **values) -> dict:
    """Write ``OUT/<name>.json`` on rank 0 (the run's settings and ``values``) and print it
    (``compact``: no indentation and only the keys other than ``curves`` printed, for large records)."""
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    mesh = f"{_shape['sample']}x{_shape['data']}" if _shape else ""  # only a tutorial that took one
    record = {"tutorial": name, "world_size": world, "mesh": mesh or f"{world}x1", "seed": SEED, "smoke": SMOKE, **values}
    if is_main():
        os.makedirs(OUT, exist_ok=True)
        suffix = f"-w{world}" + (f"-m{mesh}" if mesh else "") + f"-s{SEED}" + ("-smoke" if SMOKE else "")
        with open(os.path.join(OUT, f"{name}{suffix}.json"), "w") as f:
            json.dump(record, f, indent=None if compact else 1, separators=(",", ":") if compact else None, default=float)
        shown = {k: v for k, v in record.items() if k != "curves"} if compact else record
        print(json.dumps(shown, default=float), flush=True)
    return record


def savefig(fig, name: str) -> None:
    """Save a matplotlib figure as ``OUT/<name>.png`` on rank 0."""
    if is_main():
        os.makedirs(OUT, exist_ok=True)
        fig.savefig(os.path.join(OUT, f"{name}.png"), dpi=110, bbox_inches="tight")


def finish() -> None:
    """End the process group, if any (every rank)."""
    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def as_float(x) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)
