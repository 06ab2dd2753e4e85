# SPDX-License-Identifier: Apache-2.0
"""Benchmarks of pyro_sp, run by ``pyro-sp bench SUITE [options]``.

=============== ============================================================ ===========
suite           what                                                         module
=============== ============================================================ ===========
``overhead``    one process: ``DistributedTrace_ELBO`` / Pyro's ``Trace_ELBO`` :mod:`~pyro_sp.bench.cpu`
``cpu-step``    SVI step time and every collective per step (``--nproc``)    :mod:`~pyro_sp.bench.cpu`
``cpu-scaling`` 1 process with N particles vs ``--nproc`` ranks with N/nproc :mod:`~pyro_sp.bench.cpu`
``sync``        gradient reduction: pyro_sp's flat all-reduce vs DDP (gloo)  :mod:`~pyro_sp.bench.cpu`
``gpu-single``  step time and peak memory vs N: Pyro, pyro_sp, MeanFieldVI   :mod:`~pyro_sp.bench.gpu`
``gpu-scaling`` weak / strong scaling, one rank per GPU (``--nproc``)         :mod:`~pyro_sp.bench.gpu`
``gpu-memory``  the largest N that fits on one GPU                           :mod:`~pyro_sp.bench.gpu`
``compiled``    eager, JIT and compiled SVI steps of Pyro programs           :mod:`~pyro_sp.bench.compiled`
=============== ============================================================ ===========

``--tiny`` runs any suite in a few seconds on a CPU (the test suite does).
Every suite times its steps with :mod:`~pyro_sp.bench.timing` (the one timing
loop) and launches ranks through :mod:`pyro_sp.distributed.launch`.
Peers that need other libraries (NumPyro, torch_blue, raw torch) are scripts
in the source tree's ``benchmarks/`` folder.
"""

from __future__ import annotations

import json
import os
import sys

__all__ = ["SUITES", "format_result", "main", "write_result"]

#: suite name -> (module, its own suite name, launched with one process per rank)
SUITES = {
    "overhead": ("pyro_sp.bench.cpu", "overhead", False),
    "cpu-step": ("pyro_sp.bench.cpu", "step", True),
    "cpu-scaling": ("pyro_sp.bench.cpu", "scaling", False),
    "sync": ("pyro_sp.bench.cpu", "sync", False),
    "gpu-single": ("pyro_sp.bench.gpu", "single", False),
    "gpu-scaling": ("pyro_sp.bench.gpu", "scaling", True),
    "gpu-memory": ("pyro_sp.bench.gpu", "memory", False),
    "compiled": ("pyro_sp.bench.compiled", "compiled", False),
}


def _fmt(cell) -> str:
    if isinstance(cell, dict):
        text = f"{cell['step_ms_median']:.2f} ms"
        if "step_ms_back_to_back" in cell:
            text += f" ({cell['step_ms_back_to_back']:.2f} back to back)"
        return text + (f" / {cell['peak_gib']:.2f} GiB" if "peak_gib" in cell else "")
    if isinstance(cell, float):
        return f"{cell:.4g}"
    return str(cell)


def _table(header: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _compiled_cells(cell) -> list:
    """A ``compiled`` cell as table columns: step, compile_s, the two speedups (``-`` if none)."""
    if not isinstance(cell, dict):
        return [cell if len(cell) <= 80 else cell[:77] + "...", "-", "-", "-"]
    return [cell] + [cell.get(k) if cell.get(k) is not None else "-"
                     for k in ("compile_s", "speedup_vs_eager", "speedup_vs_jit")]


def format_result(result: dict) -> str:
    """A plain-text table of a suite's JSON result."""
    suite = result.get("suite")
    if suite == "gpu-single":
        variants = [k for k in result["rows"][0] if k != "particles"]
        return _table(["particles"] + variants, [[r["particles"]] + [r[v] for v in variants] for r in result["rows"]])
    if suite == "gpu-scaling":
        keys = ["variant", "grid", "scaling", "particles_total", "particles_per_gpu", "result"]
        return _table(keys, [[r[k] for k in keys] for r in result["rows"]])
    if suite == "gpu-memory":
        return _table(
            ["variant", "largest N that fits", "smallest N that fails"],
            [[v, r["largest_fitting"], r["smallest_failing"]] for v, r in result["variants"].items()],
        )
    if suite == "compiled":
        return _table(["program", "particles", "variant", "step", "compile s", "x pyro", "x pyro_jit"],
                      [[r["program"], r["particles"], v] + _compiled_cells(r[v]) for r in result["rows"]
                       for v in result["variants"]])
    if suite == "step":
        head = f"{result['world_size']} rank(s), step {1e3 * result['step_s_median']:.2f} ms (median)\n"
        return head + _table(["collective", "per step", "bytes", "seconds"],
                             [[k, v["collectives"], v["bytes"], v["seconds"]] for k, v in result["per_step"].items()])
    if suite == "sync":
        return _table(["variant", "median s", "reduction s"],
                      [[k, v, result["reduction_s"].get(k, "-")] for k, v in result["median_s"].items()])
    flat = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) or k == "median_step_s"}
    return json.dumps(flat, indent=2)


def write_result(path: str | None, result: dict, partial: bool = False) -> None:
    """Write a suite's or script's ``result`` as indented JSON to ``path``, making its folder (nothing
    for no path, ``None`` or ``""``). ``partial``: what was measured so far, marked ``"partial": true``, written as a
    run goes so that a time limit ending it keeps the rows; the whole result overwrites it at the end."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps({**result, "partial": True} if partial else result, indent=2) + "\n")


def main(argv: list[str]) -> int:
    """``pyro-sp bench SUITE [--nproc N] [suite options]``: run, print a table, write ``--out``."""
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUITES:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"pyro-sp bench: expected a suite in {sorted(SUITES)}, got {argv[0]!r}.", file=sys.stderr)
            return 2
        return 0
    module, suite, launched = SUITES[argv[0]]
    rest = argv[1:]
    if launched:
        import argparse

        own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        own.add_argument("--nproc", type=int, default=1)
        known, rest = own.parse_known_args(rest)
        if known.nproc < 1:
            print(f"pyro-sp bench: --nproc must be at least 1, got {known.nproc}.", file=sys.stderr)
            return 2
        if "RANK" not in os.environ:  # launch the ranks; under torchrun, run this one
            finder = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
            finder.add_argument("--out", default=None)
            out = finder.parse_known_args(rest)[0].out
            from pyro_sp.distributed.launch import launch_module

            code = launch_module(module, [suite] + rest, known.nproc, prog="pyro-sp bench")
            if code == 0 and out:
                with open(out) as f:
                    print(format_result(json.load(f)))
            return code
    import importlib

    result = importlib.import_module(module).run([suite] + rest, prog=f"pyro-sp bench {argv[0]}")
    if result:
        print(format_result(result))
    return 0
