# SPDX-License-Identifier: Apache-2.0
"""pytest plugin that runs Pyro's own test suite against pyro_sp's estimators.

Load it with ``-p pyro_conformance_plugin`` (this directory on ``PYTHONPATH``),
usually through the driver ``benchmarks/pyro_conformance.py``. Before any test
module is imported it

1. under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
   ``MASTER_PORT`` set) initialises the process group with
   :func:`pyro_sp.init_mesh`, every rank on the sample axis, with a collective
   timeout of ``PYRO_SP_CONFORMANCE_TIMEOUT`` seconds (default 60);
2. replaces every Pyro ELBO class that has a pyro_sp counterpart
   (``Trace_ELBO`` by :class:`pyro_sp.DistributedTrace_ELBO`, ...) in
   :mod:`pyro.infer` and in the ``pyro.*`` modules that define or export it,
   so ``from pyro.infer import Trace_ELBO`` in a test module gets the
   sampling-parallel estimator. ``PYRO_SP_CONFORMANCE_SWAP=0`` leaves Pyro's
   classes in place (the reference run). With ``PYRO_SP_CONFORMANCE_OPTIM=1`` it also
   replaces ``pyro.optim.Adam``, ``AdamW`` and ``SGD`` by :mod:`pyro_sp.optim`'s grouped
   optimizers (:data:`OPTIM_SWAPS`);
3. before each test, seeds every RNG with :func:`pyro.set_rng_seed` from
   ``PYRO_SP_CONFORMANCE_SEED`` (default 0) and the test's node id, the same
   on every rank (pyro_sp's estimators require identically seeded ranks, and
   a fresh process's torch seed is random); ``none`` leaves the RNGs alone.
   Tests marked ``init(rng_seed=...)`` are seeded afterwards by Pyro's conftest
   (its ``tests/infer/conftest.py`` marks every test there with seed 123),
   unless ``PYRO_SP_CONFORMANCE_OVER_MARKERS=1``: then this seed is applied
   after the marker's and wins (to rerun statistical tests under other seeds);
4. records the outcome of every test (``passed``, ``failed``, ``error``,
   ``skipped``, ``xfailed``, ``xpassed``) and, if ``PYRO_SP_CONFORMANCE_OUT``
   is set, writes them to ``$PYRO_SP_CONFORMANCE_OUT/rank{RANK}.json`` at the
   end of the session. Each finished test is also appended at once to
   ``rank{RANK}.jsonl``, so a run that is killed still leaves its results (and
   the test it was running) behind.

Only rank 0 writes to the terminal: the standard streams of the other ranks
go to ``$PYRO_SP_CONFORMANCE_OUT/rank{RANK}.log`` (they are redirected when
this module is imported, before pytest starts capturing output).

Under ``torchrun`` with ``PYRO_SP_CONFORMANCE_OUT`` set, a session whose only
problem is failing tests exits with status 0 (the real status is in the JSON):
torchrun stops every rank as soon as one exits non-zero, which would cut off
ranks that have not written their results yet.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import zlib

import pytest

#: Pyro estimator -> its pyro_sp counterpart.
SWAPS = {
    "Trace_ELBO": "DistributedTrace_ELBO",
    "JitTrace_ELBO": "DistributedJitTrace_ELBO",
    "TraceMeanField_ELBO": "DistributedTraceMeanField_ELBO",
    "JitTraceMeanField_ELBO": "DistributedJitTraceMeanField_ELBO",
    "TraceGraph_ELBO": "DistributedTraceGraph_ELBO",
    "JitTraceGraph_ELBO": "DistributedJitTraceGraph_ELBO",
    "TraceEnum_ELBO": "DistributedTraceEnum_ELBO",
    "JitTraceEnum_ELBO": "DistributedJitTraceEnum_ELBO",
    "TraceTMC_ELBO": "DistributedTraceTMC_ELBO",
    "RenyiELBO": "DistributedRenyiELBO",
    "TraceTailAdaptive_ELBO": "DistributedTraceTailAdaptive_ELBO",
}

#: Pyro optimizer -> its pyro_sp counterpart (``PYRO_SP_CONFORMANCE_OPTIM=1``).
OPTIM_SWAPS = {"Adam": "Adam", "AdamW": "AdamW", "SGD": "SGD"}

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_EXCERPT_CHARS = 2000
_CRASH_CHARS = 1000


def in_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (``torch.distributed.run``)."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _out_dir() -> str | None:
    return os.environ.get("PYRO_SP_CONFORMANCE_OUT") or None


def _redirect_nonzero_rank_output() -> None:
    """Point file descriptors 1 and 2 of ranks other than 0 at ``rank{RANK}.log``."""
    out = _out_dir()
    if not in_torchrun() or _rank() == 0 or out is None:
        return
    os.makedirs(out, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(os.path.join(out, f"rank{_rank()}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


# Must happen before pytest's capture plugin saves the original descriptors.
_redirect_nonzero_rank_output()


def swap_estimators() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """
    Replace Pyro's ELBO classes by pyro_sp's in the loaded ``pyro.*`` modules.

    A module's binding is replaced when the module is :mod:`pyro.infer`, defines
    the class, or lists it in ``__all__``. Other modules that merely import the
    class for their own use (e.g. as a base class) keep the original.

    :returns: ``(swapped, kept)``: for each class name, the modules where it was
        replaced, and the modules that still hold Pyro's class.
    """
    import pyro_sp  # first: its classes subclass the originals bound at its import

    import pyro.infer

    originals = {}
    for name, counterpart in SWAPS.items():
        orig = pyro.infer.__dict__[name]
        repl = getattr(pyro_sp, counterpart)
        if not issubclass(repl, orig):
            raise TypeError(f"Expected pyro_sp.{counterpart} to subclass pyro.infer.{name}.")
        originals[name] = orig, repl

    swapped: dict[str, list[str]] = {}
    kept: dict[str, list[str]] = {}
    for modname, module in sorted(sys.modules.items()):
        if module is None or not (modname == "pyro" or modname.startswith("pyro.")):
            continue
        namespace = getattr(module, "__dict__", {})
        exported = namespace.get("__all__", ())
        for name, (orig, repl) in originals.items():
            if namespace.get(name) is not orig:
                continue
            if modname == "pyro.infer" or modname == orig.__module__ or name in exported:
                setattr(module, name, repl)
                swapped.setdefault(name, []).append(modname)
            else:
                kept.setdefault(name, []).append(modname)
    return swapped, kept


def swap_optimizers() -> dict[str, list[str]]:
    """
    Replace ``pyro.optim.Adam``, ``AdamW`` and ``SGD`` by :mod:`pyro_sp.optim`'s in every loaded
    ``pyro.*`` module that binds them. :returns: for each name, the modules where it was replaced.
    """
    import pyro.optim

    import pyro_sp.optim

    swapped: dict[str, list[str]] = {}
    for name, counterpart in OPTIM_SWAPS.items():
        orig, repl = getattr(pyro.optim, name), getattr(pyro_sp.optim, counterpart)
        for modname, module in sorted(sys.modules.items()):
            if module is not None and (modname == "pyro" or modname.startswith("pyro.")) \
                    and getattr(module, "__dict__", {}).get(name) is orig:
                setattr(module, name, repl)
                swapped.setdefault(f"optim.{name}", []).append(modname)
    return swapped


def test_seed(seed: int, nodeid: str) -> int:
    """The RNG seed of one test: independent of test order and selection, equal on every rank."""
    return (seed + zlib.crc32(nodeid.encode())) % (1 << 32)


def _crash_message(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message)[:_CRASH_CHARS]
    text = report.longreprtext.strip().splitlines()
    return (text[-1] if text else "")[:_CRASH_CHARS]


class ConformanceRecorder:
    """Collects test outcomes and writes them per rank."""

    def __init__(self) -> None:
        self.rank = _rank()
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.distributed = in_torchrun()
        self.swap = os.environ.get("PYRO_SP_CONFORMANCE_SWAP", "1") != "0"
        self.swap_optim = os.environ.get("PYRO_SP_CONFORMANCE_OPTIM", "0") == "1"
        self.timeout_s = float(os.environ.get("PYRO_SP_CONFORMANCE_TIMEOUT", "60"))
        seed = os.environ.get("PYRO_SP_CONFORMANCE_SEED", "0")
        self.seed = None if seed.lower() == "none" else int(seed)
        self.over_markers = os.environ.get("PYRO_SP_CONFORMANCE_OVER_MARKERS", "0") == "1"
        self.out = _out_dir()
        self.tests: dict[str, dict] = {}
        self.collect_errors: dict[str, str] = {}
        self.swapped: dict[str, list[str]] = {}
        self.kept: dict[str, list[str]] = {}
        self.mesh = None
        self.started = time.time()
        self._stream = None

    # ---- setup -----------------------------------------------------------------
    @pytest.hookimpl(tryfirst=True)
    def pytest_configure(self, config) -> None:
        if self.distributed:
            import pyro_sp

            self.mesh = repr(pyro_sp.init_mesh(timeout=datetime.timedelta(seconds=self.timeout_s)))
        if self.swap:
            self.swapped, self.kept = swap_estimators()
            if self.swap_optim:
                self.swapped.update(swap_optimizers())
        if self.out is not None:
            os.makedirs(self.out, exist_ok=True)
            self._stream = open(os.path.join(self.out, f"rank{self.rank}.jsonl"), "w")

    def _emit(self, record: dict) -> None:
        if self._stream is not None:
            self._stream.write(json.dumps(record) + "\n")
            self._stream.flush()

    # ---- outcomes --------------------------------------------------------------
    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.collect_errors[report.nodeid] = report.longreprtext[:_EXCERPT_CHARS]
            self._emit({"collect_error": report.nodeid, "excerpt": self.collect_errors[report.nodeid]})

    def pytest_runtest_logstart(self, nodeid, location) -> None:
        self._emit({"start": nodeid})

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item) -> None:
        if self.seed is not None and not self.over_markers:
            self._seed(item)

    def _seed(self, item) -> None:
        import pyro

        pyro.set_rng_seed(test_seed(self.seed, item.nodeid))

    def pytest_runtest_logreport(self, report) -> None:
        rec = self.tests.setdefault(report.nodeid, {"outcome": None, "duration": 0.0})
        rec["duration"] += report.duration
        if report.failed:
            if rec["outcome"] not in ("failed", "error"):
                rec["outcome"] = "failed" if report.when == "call" else "error"
                rec["when"] = report.when
                rec["crash"] = _crash_message(report)
                rec["excerpt"] = report.longreprtext[:_EXCERPT_CHARS]
        elif report.skipped:
            if rec["outcome"] is None:
                rec["outcome"] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        elif report.when == "call" and rec["outcome"] is None:
            rec["outcome"] = "xpassed" if hasattr(report, "wasxfail") else "passed"
        if report.when == "teardown":
            rec["duration"] = round(rec["duration"], 4)
            self._emit({"nodeid": report.nodeid, **rec})

    # ---- results ---------------------------------------------------------------
    def payload(self, exitstatus) -> dict:
        import pyro
        import torch

        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "distributed": self.distributed,
            "mesh": self.mesh,
            "swap": self.swap,
            "seed": self.seed,
            "over_markers": self.over_markers,
            "swapped": self.swapped,
            "kept": self.kept,
            "pyro_version": pyro.__version__,
            "torch_version": torch.__version__,
            "exitstatus": int(exitstatus),
            "seconds": round(time.time() - self.started, 3),
            "collect_errors": self.collect_errors,
            "tests": self.tests,
        }

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if self.out is not None:
            path = os.path.join(self.out, f"rank{self.rank}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(self.payload(exitstatus), f, indent=1, sort_keys=True)
            os.replace(path + ".tmp", path)
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self.distributed:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                try:  # no rank leaves (and makes torchrun stop the others) before all wrote
                    dist.barrier()
                except Exception as exc:  # a peer is gone: nothing left to wait for
                    print(f"pyro_conformance_plugin: final barrier failed: {exc}", file=sys.stderr)
                dist.destroy_process_group()
            tests_only = (pytest.ExitCode.TESTS_FAILED, pytest.ExitCode.NO_TESTS_COLLECTED)
            if self.out is not None and exitstatus in tests_only:
                session.exitstatus = pytest.ExitCode.OK


class _SeedAfterMarkers:
    """Seeds each test after Pyro's ``init(rng_seed=...)`` marker has (``over_markers``)."""

    def __init__(self, recorder: ConformanceRecorder) -> None:
        self.recorder = recorder

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_setup(self, item) -> None:
        if self.recorder.seed is not None and self.recorder.over_markers:
            self.recorder._seed(item)


def pytest_configure(config) -> None:
    recorder = ConformanceRecorder()
    config.pluginmanager.register(recorder, "pyro_conformance_recorder")
    config.pluginmanager.register(_SeedAfterMarkers(recorder), "pyro_conformance_late_seed")
