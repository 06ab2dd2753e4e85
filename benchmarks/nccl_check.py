# SPDX-License-Identifier: Apache-2.0
"""The exactness checks of the test suite, run on GPUs with NCCL.

The CPU test suite runs every check over gloo; this script runs a
representative set on CUDA devices under torchrun (one process per GPU):
sharded estimators against the single-process Pyro estimator with pinned
particle noise in float64.
Writes one JSON line per check (rank 0) to ``--out``::

    torchrun --nproc-per-node 2 benchmarks/nccl_check.py --out nccl_check.jsonl
    torchrun --nproc-per-node 2 benchmarks/nccl_check.py --only fused --out nccl_fused.jsonl  # MeanFieldVI
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyro_sp  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="nccl_check.jsonl")
    p.add_argument("--only", choices=("all", "elbo", "fused"), default="all")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    mesh = pyro_sp.init_mesh()
    torch.set_default_device(args.device)
    from tests.common import _reset_state, assert_close
    from tests.test_estimators import estimator_case
    from tests.test_exactness import exact_case

    rows = []

    def record(name, fn):
        _reset_state()
        torch.set_default_device(args.device)
        start = time.perf_counter()
        try:
            detail = fn()
            ok, error = True, None
        except Exception:  # noqa: BLE001 - reported, then the next check
            ok, detail, error = False, None, traceback.format_exc(limit=3)
        row = {"check": name, "ok": ok, "seconds": round(time.perf_counter() - start, 2), "detail": detail, "error": error}
        rows.append(row)
        if mesh.rank == 0:
            print(json.dumps(row), flush=True)

    def exact(estimator, guide, n, plate):
        r = exact_case(estimator, guide, n, plate, mesh.world_size, 1)
        for key, ref in (("loss_lg", "ref_loss"), ("loss_l", "ref_loss_l"), ("loss_dl", "ref_loss")):
            assert_close(r[key], r[ref], msg=key)
        worst = 0.0
        for kind in ("grads_lg", "grads_dl"):
            for name, g in r[kind].items():
                assert_close(g, r["ref_grads"][name], msg=f"{kind} {name}")
                ref = r["ref_grads"][name]
                worst = max(worst, ((g - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item())
        return {"max_relative_gradient_error": worst, "device": str(r["ref_grads"][next(iter(r["ref_grads"]))].device)}

    def family(name, n):
        mine, reference = estimator_case(name, mesh.world_size, 1, n)
        for iface, (value, grads) in mine.items():
            ref_value = reference[iface if iface in reference else "loss"][0]
            assert_close(value, ref_value, msg=f"{iface} loss")
            if iface != "loss":
                for k, g in grads.items():
                    if g is not None:
                        assert_close(g, reference["loss_and_grads"][1][k], msg=f"{iface} {k}")
        return {"interfaces": sorted(mine)}

    def fused(kl, likelihood, bayesian, n, compile_):
        from tests.test_mean_field import exact_case as fused_case

        r = fused_case(kl, likelihood, bayesian, n, mesh.world_size, 1, compile=compile_)
        worst = 0.0
        for round_ in ("first", "second"):
            loss, grads = r[round_]
            assert_close(loss, r["ref_loss"], msg=f"{round_} loss")
            for name, ref in r["ref_grads"].items():
                assert_close(grads[name], ref, msg=f"{round_} {name}")
                worst = max(worst, ((grads[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item())
        return {"max_relative_gradient_error": worst, "device": str(next(iter(r["ref_grads"].values())).device)}

    if args.only in ("all", "elbo"):
        for estimator, guide, n, plate in (
            ("trace", "normal", 7, "subsample"),
            ("trace", "lowrank", 8, "none"),
            ("meanfield", "param", 7, "subsample"),
            ("jit", "normal", 9, "subsample"),
        ):
            record(f"exact {estimator}/{guide} N={n} {plate}", lambda: exact(estimator, guide, n, plate))
        for name in ("tracegraph", "traceenum", "tmc", "renyi0", "renyi05_local", "tail_pyro", "trace_sequential"):
            record(f"exact {name} N=7", lambda: family(name, 7))
    if args.only in ("all", "fused"):
        for kl, likelihood, bayesian, n, compile_ in (
            ("sample", "categorical", "all", 7, False),
            ("analytic", "normal", "last", 6, False),
            ("sample", "categorical", "all", 7, True),
            ("analytic", "categorical", "all", 5, True),
        ):
            record(f"exact MeanFieldVI kl={kl} {likelihood} bayesian={bayesian} N={n} compile={compile_}",
                   lambda: fused(kl, likelihood, bayesian, n, compile_))

    rank = mesh.rank
    if rank == 0:
        with open(args.out, "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
