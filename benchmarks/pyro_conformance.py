# SPDX-License-Identifier: Apache-2.0
"""Run Pyro's own inference tests with pyro_sp's estimators swapped in.

For every test file and every world size ``W`` given with ``--nproc``, the
driver launches ``W`` ranks with ``torchrun`` (``python -m
torch.distributed.run --standalone``), each running ``pytest`` on the file in
the Pyro checkout with the plugin ``pyro_conformance_plugin``: Pyro's ELBO
classes are replaced by pyro_sp's sampling-parallel ones, every rank on the
sample axis. A *reference* run of the same file with Pyro's own classes, in
one plain process, tells which tests are expected to pass; it is cached in
the output directory.

A swapped test passes only if it passed on every rank. The report lists, per
file, how many tests pass in the reference and how many of those also pass
swapped at each world size, and every test that passes in the reference but
not swapped, with the failure's excerpt (from rank 0 if it failed there).
Tests skipped or xfailed in the reference are not counted.

Example::

    python benchmarks/pyro_conformance.py --pyro-src ~/src/pyro --nproc 2 --nproc 3 \\
        --out /tmp/conformance tests/infer/test_valid_models.py tests/infer/test_gradient.py

Every test is seeded from ``--seed`` and its node id, identically on every
rank and in the reference (pyro_sp's estimators require identically seeded
ranks of a sample group).

Outputs (under ``--out``): ``report.md``, ``report.json``, and per run
``reference/<file>/`` and ``w<W>/<file>/`` holding ``rank<R>.json`` (results),
``rank<R>.jsonl`` (results as they came), ``rank<R>.log`` (output of ranks
other than 0) and ``pytest.log`` (output of rank 0 and of torchrun).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT_ROOT = os.path.dirname(HERE)

#: Outcomes that count as a pass.
PASSING = ("passed", "xpassed")
#: Reference outcomes that take a test out of the count.
NOT_COUNTED = ("skipped", "xfailed")

sys.path.insert(0, HERE)
from pyro_conformance_plugin import SWAPS  # noqa: E402

_ORIGINAL_NAME = {v: k for k, v in SWAPS.items()}
_DISTRIBUTED_NAME = re.compile(
    r"(?<![A-Za-z0-9_])(?:%s)(?![A-Za-z0-9_])" % "|".join(sorted(SWAPS.values(), key=len, reverse=True))
)


# ---- running -------------------------------------------------------------------


def slug(path: str) -> str:
    """A directory name for a test file: ``tests/infer/test_jit.py`` -> ``tests_infer_test_jit``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path[:-3] if path.endswith(".py") else path)


def _pythonpath() -> str:
    """``PYTHONPATH`` for the ranks: the plugin's directory, and the project if pyro_sp is not installed."""
    parts = [HERE]
    try:
        import pyro_sp  # noqa: F401
    except ImportError:
        parts.append(PROJECT_ROOT)  # after the plugin; Pyro's ``tests`` package comes from its checkout
    old = os.environ.get("PYTHONPATH")
    return os.pathsep.join(parts + ([old] if old else []))


def run_pytest(
    cmd: list[str],
    *,
    cwd: str,
    out_dir: str,
    env_extra: dict[str, str],
    timeout: float,
    echo: bool,
) -> dict:
    """
    Run one pytest session (plain or under torchrun) in its own process group.

    Output goes to ``out_dir/pytest.log`` and, with ``echo``, to stdout. After
    ``timeout`` seconds the whole process group is killed.

    :returns: ``{"returncode", "seconds", "timed_out", "command"}``.
    """
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # results of an earlier run must not be mistaken for this one's
        if name.startswith("rank") or name in ("pytest.log", "key.json"):
            os.remove(os.path.join(out_dir, name))
    env = dict(os.environ)
    env.update(env_extra)
    env["PYRO_SP_CONFORMANCE_OUT"] = out_dir
    env["PYTHONPATH"] = _pythonpath()
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    start = time.time()
    with open(os.path.join(out_dir, "pytest.log"), "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
            errors="replace",
        )

        def pump():
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        reader.join(timeout=10)
        if timed_out:
            log.write(f"\n*** killed after {timeout:.0f} s (--timeout-per-file)\n")
    return {
        "returncode": proc.returncode,
        "seconds": round(time.time() - start, 1),
        "timed_out": timed_out,
        "command": cmd,
    }


def _seed_env(args: argparse.Namespace) -> dict[str, str]:
    return {
        "PYRO_SP_CONFORMANCE_SEED": args.seed,
        "PYRO_SP_CONFORMANCE_OVER_MARKERS": "1" if args.seed_over_markers else "0",
    }


def _took(run: dict) -> str:
    return f"{run['seconds']} s" + (" TIMEOUT" if run["timed_out"] else "")


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL what is left."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def pytest_args(test_file: str, args: argparse.Namespace) -> list[str]:
    """The pytest command line (after ``-m pytest``) for one file, with Pyro's configuration."""
    cmd = [
        test_file,
        "-p", "pyro_conformance_plugin",
        "--rootdir", args.pyro_src,
        "-c", os.path.join(args.pyro_src, "setup.cfg"),
        "--tb=short",
        "-q",
        "-p", "no:cacheprovider",
    ]
    if args.k:
        cmd += ["-k", args.k]
    return cmd + list(args.pytest_arg)


# ---- results -------------------------------------------------------------------


def canonical_nodeid(nodeid: str) -> str:
    """
    The node id a test has in the reference. Pyro parametrizes many tests by
    estimator class, whose ``__name__`` is in the id: ``test_x[Trace_ELBO]``
    becomes ``test_x[DistributedTrace_ELBO]`` when swapped; map it back.
    """
    head, sep, params = nodeid.partition("[")
    if not sep:
        return nodeid
    return head + sep + _DISTRIBUTED_NAME.sub(lambda m: _ORIGINAL_NAME[m.group(0)], params)


def load_rank(run_dir: str, rank: int) -> dict | None:
    """
    The results of one rank: its ``rank<R>.json``, or, for a rank that was
    killed, what its ``rank<R>.jsonl`` holds (with the test it was running).
    """
    path = os.path.join(run_dir, f"rank{rank}.json")
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
        data["tests"] = {canonical_nodeid(n): rec for n, rec in data["tests"].items()}
        data["complete"] = True
        return data
    path += "l"
    if not os.path.exists(path):
        return None
    tests, collect_errors, running = {}, {}, None
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut off by the kill
            if "start" in rec:
                running = canonical_nodeid(rec["start"])
            elif "collect_error" in rec:
                collect_errors[rec["collect_error"]] = rec["excerpt"]
            else:
                nodeid = canonical_nodeid(rec.pop("nodeid"))
                tests[nodeid] = rec
                if running == nodeid:
                    running = None
    return {
        "rank": rank,
        "complete": False,
        "running": running,
        "tests": tests,
        "collect_errors": collect_errors,
    }


def merge_ranks(ranks: dict[int, dict | None], world: int) -> dict[str, dict]:
    """
    Merge per-rank outcomes: a test passes only if every rank passed it.

    :returns: ``nodeid -> {"outcome", "outcomes": [per rank], "crash", "excerpt", "from_rank"}``.
    """
    nodeids: list[str] = []
    for data in ranks.values():
        for nodeid in (data or {}).get("tests", {}):
            if nodeid not in nodeids:
                nodeids.append(nodeid)
    merged = {}
    for nodeid in nodeids:
        per_rank = []
        for r in range(world):
            rec = ((ranks.get(r) or {}).get("tests") or {}).get(nodeid)
            per_rank.append(rec["outcome"] if rec else "missing")
        if all(o in PASSING for o in per_rank):
            outcome = "passed"
        elif all(o in NOT_COUNTED for o in per_rank):
            outcome = per_rank[0]
        elif any(o in ("failed", "error") for o in per_rank):
            outcome = "failed"
        else:
            outcome = "mixed" if "missing" not in per_rank else "missing"
        entry = {"outcome": outcome, "outcomes": per_rank}
        if outcome != "passed":
            for r in range(world):  # rank 0's failure first
                rec = ((ranks.get(r) or {}).get("tests") or {}).get(nodeid)
                if rec and rec["outcome"] in ("failed", "error"):
                    entry.update(crash=rec.get("crash", ""), excerpt=rec.get("excerpt", ""), from_rank=r)
                    break
        merged[nodeid] = entry
    return merged


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def reference_key(test_file: str, args: argparse.Namespace) -> dict:
    """What a cached reference depends on."""
    import pyro
    import torch

    return {
        "file": test_file,
        "sha256": file_digest(os.path.join(args.pyro_src, test_file)),
        "k": args.k,
        "seed": args.seed,
        **({"seed_over_markers": True} if args.seed_over_markers else {}),
        "pytest_arg": list(args.pytest_arg),
        "pyro": pyro.__version__,
        "torch": torch.__version__,
    }


def run_reference(test_file: str, args: argparse.Namespace) -> dict:
    """Pyro's own classes on one file, in one plain process; cached in ``--out/reference``."""
    run_dir = os.path.join(args.out, "reference", slug(test_file))
    key_path = os.path.join(run_dir, "key.json")
    key = reference_key(test_file, args)
    cached_results = os.path.exists(key_path) and os.path.exists(os.path.join(run_dir, "rank0.json"))
    if not args.reference and cached_results:
        with open(key_path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            print(f"[reference] {test_file}: cached ({cached['run']['seconds']} s)", flush=True)
            return {"run": cached["run"], "rank0": load_rank(run_dir, 0), "cached": True}
    print(f"[reference] {test_file} ...", flush=True)
    cmd = [sys.executable, "-m", "pytest"] + pytest_args(test_file, args)
    run = run_pytest(
        cmd,
        cwd=args.pyro_src,
        out_dir=run_dir,
        env_extra={"PYRO_SP_CONFORMANCE_SWAP": "0", **_seed_env(args)},
        timeout=args.timeout_per_file,
        echo=not args.quiet,
    )
    with open(key_path, "w") as f:
        json.dump({"key": key, "run": run}, f, indent=1)
    print(f"[reference] {test_file}: {_took(run)}", flush=True)
    return {"run": run, "rank0": load_rank(run_dir, 0), "cached": False}


def run_swapped(test_file: str, world: int, args: argparse.Namespace) -> dict:
    """pyro_sp's classes on one file, ``world`` ranks under torchrun."""
    run_dir = os.path.join(args.out, f"w{world}", slug(test_file))
    key_path = os.path.join(run_dir, "key.json")
    key = {
        **reference_key(test_file, args),
        "world": world,
        "swap": not args.no_swap,
        "optim": args.optim,
        "collective_timeout": args.collective_timeout,
    }
    if args.resume and os.path.exists(key_path):
        with open(key_path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            print(f"[w={world}] {test_file}: reused ({cached['run']['seconds']} s)", flush=True)
            return {"run": cached["run"], "ranks": {r: load_rank(run_dir, r) for r in range(world)}}
    print(f"[w={world}] {test_file} ...", flush=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes", "1", "--nproc-per-node", str(world),
        "-m", "pytest",
    ] + pytest_args(test_file, args)
    env_extra = {
        "PYRO_SP_CONFORMANCE_TIMEOUT": str(args.collective_timeout),
        **_seed_env(args),
    }
    if args.no_swap:
        env_extra["PYRO_SP_CONFORMANCE_SWAP"] = "0"
    if args.optim:
        env_extra["PYRO_SP_CONFORMANCE_OPTIM"] = "1"
    run = run_pytest(
        cmd,
        cwd=args.pyro_src,
        out_dir=run_dir,
        env_extra=env_extra,
        timeout=args.timeout_per_file,
        echo=not args.quiet,
    )
    with open(key_path, "w") as f:
        json.dump({"key": key, "run": run}, f, indent=1)
    ranks = {r: load_rank(run_dir, r) for r in range(world)}
    print(f"[w={world}] {test_file}: {_took(run)}", flush=True)
    return {"run": run, "ranks": ranks}


def summarize_file(test_file: str, ref: dict, swapped: dict[int, dict]) -> dict:
    """The report entry of one file."""
    rank0 = ref["rank0"] or {"tests": {}, "collect_errors": {}}
    ref_tests = rank0["tests"]
    counts: dict[str, int] = {}
    for rec in ref_tests.values():
        counts[rec["outcome"]] = counts.get(rec["outcome"], 0) + 1
    ref_passing = [n for n, rec in ref_tests.items() if rec["outcome"] in PASSING]
    entry = {
        "reference": {
            "passed": len(ref_passing),
            "counted": sum(1 for rec in ref_tests.values() if rec["outcome"] not in NOT_COUNTED),
            "outcomes": counts,
            "seconds": ref["run"]["seconds"],
            "timed_out": ref["run"]["timed_out"],
            "complete": bool(ref["rank0"] and ref["rank0"].get("complete")),
            "collect_errors": list(rank0.get("collect_errors", {})),
        },
        "runs": {},
    }
    for world, res in sorted(swapped.items()):
        merged = merge_ranks(res["ranks"], world)
        regressions = []
        for nodeid in ref_passing:
            m = merged.get(nodeid, {"outcome": "missing", "outcomes": ["missing"] * world})
            if m["outcome"] != "passed":
                regressions.append({"nodeid": nodeid, **m})
        merged_counts: dict[str, int] = {}
        for m in merged.values():
            merged_counts[m["outcome"]] = merged_counts.get(m["outcome"], 0) + 1
        reported = {r: d for r, d in res["ranks"].items() if d is not None}
        first = next(iter(reported.values()), {}) or {}
        entry["runs"][str(world)] = {
            "passed_of_reference": len(ref_passing) - len(regressions),
            "outcomes": merged_counts,
            "seconds": res["run"]["seconds"],
            "timed_out": res["run"]["timed_out"],
            "returncode": res["run"]["returncode"],
            "ranks_reported": sorted(reported),
            "ranks_complete": sorted(r for r, d in reported.items() if d.get("complete")),
            "running_when_stopped": {str(r): d["running"] for r, d in reported.items() if d.get("running")},
            "collect_errors": sorted({n for d in reported.values() for n in d.get("collect_errors", {})}),
            "swapped": first.get("swapped", {}),
            "mesh": first.get("mesh"),
            "regressions": regressions,
            "fixed": sorted(
                n for n, m in merged.items()
                if m["outcome"] == "passed" and ref_tests.get(n, {}).get("outcome") in ("failed", "error")
            ),
        }
    return entry


# ---- reporting -----------------------------------------------------------------


def table(report: dict) -> list[str]:
    """The summary table (markdown) of a report."""
    worlds = report["world_sizes"]
    head = "| file | reference passed (s) | " + " | ".join(f"W={w} passed (s)" for w in worlds) + " |"
    lines = [head, "|" + "---|" * (2 + len(worlds))]
    totals = {"ref": 0, **{w: 0 for w in worlds}}
    for test_file, entry in report["files"].items():
        ref = entry["reference"]
        totals["ref"] += ref["passed"]
        cells = [f"{ref['passed']} ({ref['seconds']:.0f})" + (" timeout" if ref["timed_out"] else "")]
        for w in worlds:
            run = entry["runs"].get(str(w))
            if run is None:
                cells.append("-")
                continue
            totals[w] += run["passed_of_reference"]
            note = " timeout" if run["timed_out"] else ""
            if not run["timed_out"] and len(run["ranks_complete"]) < w:
                note = " crashed"
            cells.append(f"{run['passed_of_reference']}/{ref['passed']} ({run['seconds']:.0f}){note}")
        lines.append(f"| {test_file} | " + " | ".join(cells) + " |")
    lines.append(
        f"| **total** | {totals['ref']} | "
        + " | ".join(f"{totals[w]}/{totals['ref']}" for w in worlds)
        + " |"
    )
    return lines


def write_report(report: dict, out: str) -> None:
    """``report.json`` and ``report.md`` in ``out``."""
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, sort_keys=False)
    md = ["# Pyro conformance of pyro_sp estimators", ""]
    md.append(
        f"Pyro checkout: `{report['pyro_src']}`; Pyro {report['pyro_version']}, "
        f"torch {report['torch_version']}."
    )
    md.append(
        "A test counts if it passes with Pyro's own classes (one process); it passes swapped if it "
        "passes on every rank with pyro_sp's classes, every rank on the sample axis. Cells: "
        "passed of reference (seconds)."
    )
    if report.get("seed_over_markers"):
        md.append(
            f"Every test is seeded from base seed {report['seed']} and its node id (the same on "
            "every rank), after and instead of its own `init(rng_seed=...)` marker."
        )
    else:
        md.append(
            f"Every test is seeded from base seed {report['seed']} and its node id (the same on "
            "every rank), unless its own `init(rng_seed=...)` marker seeds it."
        )
    md.append("")
    md += table(report)
    for test_file, entry in report["files"].items():
        for w, run in entry["runs"].items():
            extra = []
            if run["timed_out"]:
                extra.append(f"timed out; running: {run['running_when_stopped'] or 'unknown'}")
            if run["collect_errors"]:
                extra.append(f"collection errors: {run['collect_errors']}")
            if not run["regressions"] and not extra:
                continue
            md += ["", f"## {test_file}, W={w}: {len(run['regressions'])} pass in Pyro, not swapped", ""]
            md += [f"- {e}" for e in extra]
            for reg in run["regressions"]:
                per_rank = ", ".join(reg["outcomes"])
                md.append(f"- `{reg['nodeid']}` — {reg['outcome']} (per rank: {per_rank})")
                if reg.get("crash"):
                    md.append(f"  - rank {reg['from_rank']}: `{reg['crash'].splitlines()[0][:300]}`")
            details = [r for r in run["regressions"] if r.get("excerpt")]
            if details:
                md += ["", "<details><summary>failure excerpts</summary>", ""]
                for reg in details:
                    md += [f"### `{reg['nodeid']}` (rank {reg['from_rank']})", ""]
                    md += ["```", reg["excerpt"], "```", ""]
                md.append("</details>")
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")


# ---- command line --------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "Run Pyro's own test files with pyro_sp's sampling-parallel estimators swapped in for "
            "Pyro's ELBO classes, under torchrun, and compare with Pyro's classes in one process."
        ),
        epilog=(
            "Each file runs in its own torchrun launch per world size, with the Pyro checkout as "
            "working directory and pytest configuration (its setup.cfg). Results: --out/report.md "
            "and --out/report.json."
        ),
    )
    p.add_argument(
        "files", nargs="+", metavar="FILE",
        help="test files, relative to the Pyro checkout (e.g. tests/infer/test_gradient.py)",
    )
    p.add_argument(
        "--pyro-src", required=True, metavar="DIR", help="Pyro source checkout holding tests/ and setup.cfg"
    )
    p.add_argument(
        "--nproc", type=int, action="append", metavar="W",
        help="world size (ranks per torchrun launch); repeat for several (default: 2)",
    )
    p.add_argument(
        "--out", default="pyro-conformance", metavar="DIR", help="output directory (default: %(default)s)"
    )
    p.add_argument(
        "--reference", action="store_true",
        help="rerun the reference (Pyro's classes) even if cached in --out",
    )
    p.add_argument(
        "--resume", action="store_true",
        help="reuse the torchrun runs already in --out made with the same file, options and versions",
    )
    p.add_argument(
        "--no-swap", action="store_true",
        help=(
            "keep Pyro's classes in the torchrun runs too (a control: failures then come from the "
            "launch, not pyro_sp)"
        ),
    )
    p.add_argument(
        "--optim", action="store_true",
        help="also swap pyro.optim.Adam, AdamW and SGD for pyro_sp.optim's grouped optimizers",
    )
    p.add_argument(
        "--timeout-per-file", type=float, default=900, metavar="S",
        help=(
            "wall-clock limit of one file's run; its process group is killed after it "
            "(default: %(default)s)"
        ),
    )
    p.add_argument(
        "--collective-timeout", type=float, default=60, metavar="S",
        help="timeout of every collective of the ranks (PYRO_SP_CONFORMANCE_TIMEOUT; default: %(default)s)",
    )
    p.add_argument(
        "--seed", default="0", metavar="N",
        help=(
            "base seed: every test is seeded (pyro.set_rng_seed) from it and its node id, the same on "
            "every rank and in the reference; a test's own init(rng_seed=...) marker (which Pyro's "
            "tests/infer/conftest.py gives every test there) still wins; 'none' leaves the RNGs "
            "unseeded, so ranks draw different noise (default: %(default)s)"
        ),
    )
    p.add_argument(
        "--seed-over-markers", action="store_true",
        help=(
            "apply the --seed seeding after Pyro's init(rng_seed=...) markers, so it wins: reruns "
            "statistical tests under other seeds (the reference runs with the same seeds)"
        ),
    )
    p.add_argument("-k", metavar="EXPR", help="pytest -k expression, passed to every run")
    p.add_argument(
        "--pytest-arg", action="append", default=[], metavar="ARG",
        help="extra pytest argument (repeatable; e.g. --pytest-arg=-x)",
    )
    p.add_argument(
        "-q", "--quiet", action="store_true",
        help="do not echo pytest's output, only progress and the table",
    )
    args = p.parse_args(argv)
    args.nproc = sorted(set(args.nproc or [2]))
    if args.seed.lower() != "none" and not args.seed.isdigit():
        p.error("--seed must be a non-negative integer or 'none'")
    if any(w < 1 for w in args.nproc):
        p.error("--nproc must be positive")
    args.pyro_src = os.path.abspath(args.pyro_src)
    args.out = os.path.abspath(args.out)
    if not os.path.exists(os.path.join(args.pyro_src, "setup.cfg")):
        p.error(f"no setup.cfg in --pyro-src {args.pyro_src}")
    for test_file in args.files:
        if not os.path.exists(os.path.join(args.pyro_src, test_file)):
            p.error(f"no {test_file} in --pyro-src {args.pyro_src}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import pyro
    import torch

    report = {
        "pyro_src": args.pyro_src,
        "pyro_version": pyro.__version__,
        "torch_version": torch.__version__,
        "world_sizes": args.nproc,
        "k": args.k,
        "swap": not args.no_swap,
        "seed": args.seed,
        "seed_over_markers": args.seed_over_markers,
        "files": {},
    }
    for test_file in args.files:
        ref = run_reference(test_file, args)
        swapped = {w: run_swapped(test_file, w, args) for w in args.nproc}
        report["files"][test_file] = summarize_file(test_file, ref, swapped)
        write_report(report, args.out)  # after every file, so a long run can be read as it goes
    print()
    print("\n".join(table(report)))
    print(f"\nreport: {os.path.join(args.out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
