# SPDX-License-Identifier: Apache-2.0
"""The compiled step against the eager and JIT ones (``compiled``): for each program of
:mod:`pyro_sp.bench.programs` and each variant, one full ``SVI.step`` with
``pyro.optim.Adam``, side by side in one process. Not a test: writes JSON.

Variants, every one with ``vectorize_particles=True`` and the program's estimator family
(``Trace_ELBO`` or ``TraceEnum_ELBO``):

``pyro``                     Pyro's eager estimator;
``pyro_jit``                 Pyro's ``JitTrace_ELBO`` / ``JitTraceEnum_ELBO``;
``pyro_sp``                  pyro_sp's eager ``DistributedTrace_ELBO`` / ``DistributedTraceEnum_ELBO``;
``pyro_sp_compiled``         the same with ``compile=True`` (inductor, :mod:`pyro_sp.infer.compiled`);
``pyro_sp_compiled_graphs``  ``compile=True, cuda_graphs=True`` (CUDA only; not run on a CPU);
``pyro_grouped``             ``pyro`` with :func:`pyro_sp.optim.Adam` (one optimizer step for all
                             parameters) in place of ``pyro.optim.Adam``: the optimizer's share;
``pyro_sp_compiled_grouped`` ``compile=True`` (with ``cuda_graphs=True`` on CUDA) and
                             :func:`pyro_sp.optim.Adam`: the fastest general path.

A cell is ``{"step_ms_median", "peak_gib" (CUDA)}`` from :func:`~pyro_sp.bench.timing.timed`,
plus ``speedup_vs_eager`` (``pyro``'s median over this one's) and ``speedup_vs_jit``
(``pyro_jit``'s over this one's; ``None`` where that one did not run or failed). The
compiling variants (``pyro_jit`` and the compiled ones) add ``compile_s``: the wall time of
the first :data:`COMPILE_STEPS` steps (eager, capture, compile, first compiled step), which
are part of the warm-up. A compiled variant whose capture was refused (it then runs eagerly)
adds ``fallback``: the first line of the warning. A variant that raises is the string
``"failed: <type>: <first line of the message>"``, and the suite goes on.

The particles: ``vae`` 1 and ``mlp`` 8, 32, 64 (``--tiny``: 2), both set by
``--particles``; ``gmm`` 1; ``small`` 8.

Examples::

    pyro-sp bench compiled --device cuda --out compiled.json
    pyro-sp bench compiled --device cpu --programs small gmm vae
    pyro-sp bench compiled --programs mlp --particles 8 64 --variants pyro pyro_sp_compiled
"""

from __future__ import annotations

import argparse
import json
import warnings

import pyro
import torch
import torch._dynamo
from pyro.infer import SVI, JitTrace_ELBO, JitTraceEnum_ELBO, Trace_ELBO, TraceEnum_ELBO

import pyro_sp
from pyro_sp.bench import write_result
from pyro_sp.bench.programs import PROGRAMS, Program, build
from pyro_sp.bench.timing import step_times, timed
from pyro_sp.infer.compiled import CompileFallbackWarning

__all__ = ["COMPILE_STEPS", "VARIANTS", "make_step", "parser", "run"]

VARIANTS = ("pyro", "pyro_jit", "pyro_sp", "pyro_sp_compiled", "pyro_sp_compiled_graphs", "pyro_grouped",
            "pyro_sp_compiled_grouped")
#: The variants that compile in their first steps (and report ``compile_s``).
COMPILING = ("pyro_jit", "pyro_sp_compiled", "pyro_sp_compiled_graphs", "pyro_sp_compiled_grouped")
#: The first steps of a compiled estimator: eager, capture, compile, first compiled step.
COMPILE_STEPS = 4
#: family -> (Pyro's eager estimator, Pyro's JIT one, pyro_sp's)
ESTIMATORS = {
    "trace": (Trace_ELBO, JitTrace_ELBO, pyro_sp.DistributedTrace_ELBO),
    "enum": (TraceEnum_ELBO, JitTraceEnum_ELBO, pyro_sp.DistributedTraceEnum_ELBO),
}
#: pyro_sp's estimator arguments per variant
PYRO_SP_KWARGS = {
    "pyro_sp": {},
    "pyro_sp_compiled": {"compile": True},
    "pyro_sp_compiled_graphs": {"compile": True, "cuda_graphs": True},
    "pyro_sp_compiled_grouped": {"compile": True},  # + cuda_graphs on CUDA (estimator())
}
#: program -> its particle counts when ``--particles`` does not set them (tiny, full)
PARTICLES = {"vae": ([1], [1]), "gmm": ([1], [1]), "small": ([8], [8]), "mlp": ([2], [8, 32, 64])}
#: the programs whose particle counts ``--particles`` sets
SWEPT = ("vae", "mlp")


def estimator(variant: str, program: Program, num_particles: int):
    """The ELBO of ``variant`` for ``program``'s family, with ``num_particles`` vectorized particles."""
    eager, jit, sharded = ESTIMATORS[program.family]
    kwargs = dict(program.elbo_kwargs, num_particles=num_particles, vectorize_particles=True)
    if variant in ("pyro", "pyro_grouped"):
        return eager(**kwargs)
    if variant == "pyro_jit":
        return jit(ignore_jit_warnings=True, **kwargs)
    if variant not in PYRO_SP_KWARGS:
        raise ValueError(f"Expected a variant in {VARIANTS}, got {variant!r}.")
    options = dict(PYRO_SP_KWARGS[variant])
    if variant == "pyro_sp_compiled_grouped" and program.args[0].device.type == "cuda":
        options["cuda_graphs"] = True
    return sharded(**kwargs, **options)


def make_step(variant: str, program: Program, num_particles: int):
    """A function that runs one ``SVI.step`` of ``variant`` on ``program``."""
    adam = pyro_sp.optim.Adam if variant.endswith("_grouped") else pyro.optim.Adam
    svi = SVI(program.model, program.guide, adam({"lr": program.lr}),
              loss=estimator(variant, program, num_particles))
    return lambda: svi.step(*program.args)


def _failure(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"failed: {type(error).__name__}: {lines[0] if lines else ''}"


def _measure(variant: str, name: str, num_particles: int, args, device: torch.device) -> dict:
    """Build ``name`` afresh, time its first :data:`COMPILE_STEPS` steps as one block, then
    :func:`~pyro_sp.bench.timing.timed` the rest of the warm-up and the timed steps."""
    pyro.set_rng_seed(0)
    program = build(name, args.tiny, device)
    step = make_step(variant, program, num_particles)
    first, _ = step_times(lambda: [step() for _ in range(COMPILE_STEPS)], steps=1, device=device)
    cell = timed(step, warmup=args.warmup - COMPILE_STEPS, steps=args.steps, device=device)
    if variant in COMPILING:
        cell["compile_s"] = first[0]
    return cell


def attempt(variant: str, name: str, num_particles: int, args, device: torch.device) -> dict | str:
    """One cell: the timing dict of ``variant`` on program ``name``, or why there is none.
    The param store is cleared and ``torch._dynamo`` reset before and after."""
    if variant == "pyro_sp_compiled_graphs" and device.type != "cuda":
        return "skipped: cuda_graphs needs a CUDA device (--device cuda)"
    pyro.clear_param_store()
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CompileFallbackWarning)
            cell = _measure(variant, name, num_particles, args, device)
    except Exception as error:  # noqa: BLE001 - a failing variant is a result, the suite goes on
        return _failure(error)
    finally:
        pyro.clear_param_store()
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fallbacks = [w for w in caught if issubclass(w.category, CompileFallbackWarning)]
    for w in caught:  # the other warnings, shown as usual
        if w not in fallbacks:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if fallbacks:
        cell["fallback"] = str(fallbacks[0].message).strip().splitlines()[0]
    return cell


def _add_speedups(row: dict, variants) -> None:
    """``speedup_vs_eager`` and ``speedup_vs_jit`` of every timed cell of ``row``."""
    def base(key):
        cell = row.get(key)
        return cell["step_ms_median"] if isinstance(cell, dict) else None

    eager, jit = base("pyro"), base("pyro_jit")
    for variant in variants:
        cell = row[variant]
        if isinstance(cell, dict):
            ms = cell["step_ms_median"]
            cell["speedup_vs_eager"] = eager / ms if eager is not None else None
            cell["speedup_vs_jit"] = jit / ms if jit is not None else None


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def particles(name: str, args) -> list[int]:
    """The particle counts of program ``name`` (:data:`PARTICLES`, ``--particles`` for :data:`SWEPT`)."""
    if name in SWEPT and args.particles:
        return args.particles
    tiny, full = PARTICLES[name]
    return tiny if args.tiny else full


def compiled(args) -> dict:
    """Every (program, particles) row of every variant; one JSON line per row as it goes (rank 0)."""
    device = _device(args.device)
    rows = []
    for name in args.programs:
        for n in particles(name, args):
            row = {"program": name, "particles": n}
            for variant in args.variants:
                row[variant] = attempt(variant, name, n, args, device)
            _add_speedups(row, args.variants)
            rows.append(row)
            if _rank() == 0:
                print(json.dumps(row), flush=True)
    return {"suite": "compiled", "rows": rows}


def _device(name: str) -> torch.device:
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("Expected a CUDA device for --device cuda, but torch sees none. Use --device cpu.")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=("compiled",))
    p.add_argument("--programs", nargs="+", choices=tuple(PROGRAMS), default=list(PROGRAMS))
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                   help="default: all (without pyro_sp_compiled_graphs on a CPU)")
    p.add_argument("--particles", type=int, nargs="+", default=None,
                   help="particle counts of vae and mlp (default: vae 1; mlp 8 32 64, --tiny 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed steps, at least {COMPILE_STEPS} (default 6; --tiny {COMPILE_STEPS})")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --tiny 2)")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls and convolutions (default: full fp32)")
    p.add_argument("--tiny", action="store_true", help="tiny programs and few steps (a smoke run)")
    p.add_argument("--out", default=None, help="JSON file (rank 0)")
    return p


def _check(p: argparse.ArgumentParser, args) -> None:
    if args.variants is None:
        args.variants = [v for v in VARIANTS if args.device == "cuda" or v != "pyro_sp_compiled_graphs"]
    if args.warmup is None:
        args.warmup = COMPILE_STEPS if args.tiny else 6
    if args.steps is None:
        args.steps = 2 if args.tiny else 20
    if args.warmup < COMPILE_STEPS:
        p.error(f"expected --warmup >= {COMPILE_STEPS} (eager, capture, compile and first compiled step "
                f"come before the timed steps), got {args.warmup}. Pass --warmup {COMPILE_STEPS} or more.")
    if args.steps < 1 or any(n < 1 for n in args.particles or []):
        p.error(f"expected --steps and --particles >= 1, got --steps {args.steps} --particles {args.particles}.")


def run(argv=None, prog: str | None = None) -> dict:
    p = parser(prog)
    args = p.parse_args(argv)
    _check(p, args)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    result = compiled(args)
    result["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result.update(tiny=args.tiny, warmup=args.warmup, steps=args.steps, tf32=args.tf32, variants=list(args.variants))
    result["versions"] = {"torch": torch.__version__, "pyro": pyro.__version__, "pyro_sp": pyro_sp.__version__}
    if args.out and _rank() == 0:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    run()
