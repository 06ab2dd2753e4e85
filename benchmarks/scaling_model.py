# SPDX-License-Identifier: Apache-2.0
"""A scaling MODEL (predictions, not measurements) for sampling parallelism
on W GPUs of one host, calibrated on the 1- and 2-GPU runs of
``DistributedTrace_ELBO``: files of ``pyro-sp bench gpu-scaling`` (variants
``pyro_sp`` and ``pyro_sp_primitives``, sample axis only), or those recorded
with the former ``benchmarks/gpu_mlp.py`` (``benchmarks/results/h200x2_scaling_*.json``).

Per step on W GPUs with n particles per GPU:

    t_W(n) = c(n) + a_W + o

- c(n) = c0 + c1 n: the per-GPU compute, fitted by least squares to the
  1-GPU step times at several N;
- a_W = 2 (W - 1) / W * S / B: a ring all-reduce of the S gradient bytes,
  with the bus bandwidth B calibrated from the measured 2-GPU all-reduce
  (a_2 = S / B);
- o: what the 2-GPU steps cost beyond c + a_2 (synchronisation, waiting for
  the slower rank), taken as constant in W, and never below zero (a negative
  fit is run-to-run noise, not a speed-up).

Weak-scaling efficiency: c(n) / t_W(n); strong: t_1(N) / (W t_W(N / W)).

    python benchmarks/scaling_model.py benchmarks/results/h200x2_scaling_r1_1gpu.json \\
        benchmarks/results/h200x2_scaling_r1_2gpu_sample.json [more 1-GPU / 2-GPU files...]

``--fused`` reads ``pyro-sp bench gpu-scaling`` files (``MeanFieldVI``, variant
``fused``), which record no separate all-reduce time: there a_2 is the whole
measured 2-GPU extra t_2(n) - t_1(n) at equal n per GPU (all of it treated as
ring traffic, so it grows by 2 (W - 1) / W like the all-reduce), and o = 0::

    python benchmarks/scaling_model.py --fused benchmarks/results/h100x2_fused/run9_mlp_whole_1gpu.json \\
        benchmarks/results/h100x2_fused/run8_mlp_fused_1gpu.json benchmarks/results/h100x2_fused/run9_mlp_whole_2gpu.json
"""

from __future__ import annotations

import json
import statistics
import sys


def _row(r: dict) -> dict | None:
    """A row of either format as ``{gpus, particles_total, particles_per_gpu, step_ms_median,
    gradient_all_reduce_per_step: {ms}}``, or None for a row the model does not use."""
    if "result" not in r:  # recorded with the former benchmarks/gpu_mlp.py
        return r if r.get("mode", "sample_parallel") == "sample_parallel" else None
    if r["variant"] not in ("pyro_sp", "pyro_sp_primitives") or not isinstance(r["result"], dict) \
            or not r["grid"].endswith("x1"):
        return None
    reduce_s = r["result"]["collectives_per_step"]["all_reduce_gradients"]["seconds"]
    return {"gpus": r["gpus"], "particles_total": r["particles_total"], "particles_per_gpu": r["particles_per_gpu"],
            "step_ms_median": r["result"]["step_ms_median"], "gradient_all_reduce_per_step": {"ms": 1e3 * reduce_s}}


def load(paths):
    one, two = {}, []
    for path in paths:
        with open(path) as f:
            rows = [_row(r) for r in json.load(f)["rows"]]
        for r in rows:
            if r is None:
                continue
            if r["gpus"] == 1:
                one.setdefault(r["particles_total"], []).append(r["step_ms_median"])
            elif r["gpus"] == 2:
                two.append(r)
    return {n: statistics.mean(v) for n, v in one.items()}, two


def fit(one):
    xs, ys = list(one), [one[n] for n in one]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    c1 = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - c1 * mx, c1


def main(paths):
    one, two = load(paths)
    c0, c1 = fit(one)
    compute = lambda n: c0 + c1 * n  # noqa: E731
    a2 = statistics.mean(r["gradient_all_reduce_per_step"]["ms"] for r in two)
    fitted_overhead = statistics.mean(
        r["step_ms_median"] - compute(r["particles_per_gpu"]) - r["gradient_all_reduce_per_step"]["ms"] for r in two
    )
    overhead = max(0.0, fitted_overhead)
    step = lambda w, n: compute(n) + (2 * (w - 1) / w * a2 if w > 1 else 0.0) + (overhead if w > 1 else 0.0)  # noqa: E731
    out = {
        "calibration": {
            "c0_ms": c0,
            "c1_ms_per_particle": c1,
            "allreduce_2gpu_ms": a2,
            "overhead_fitted_ms": fitted_overhead,
            "overhead_used_ms": overhead,
        },
        "weak": {},
        "strong": {},
    }
    for n in (8, 32):
        out["weak"][n] = {w: compute(n) / step(w, n) for w in (2, 4, 8)}
    for total in (64, 256):
        out["strong"][total] = {w: compute(total) / (w * step(w, total / w)) for w in (2, 4, 8)}
    print(json.dumps(out, indent=2))
    return out


def main_fused(paths):
    one, two = {}, {}
    for path in paths:
        with open(path) as f:
            for r in json.load(f)["rows"]:
                if r["variant"] != "fused" or not isinstance(r["result"], dict) or r["grid"] not in ("1x1", "2x1"):
                    continue
                table = one if r["gpus"] == 1 else two
                table.setdefault(int(r["particles_per_gpu"]), []).append(r["result"]["step_ms_median"])
    one = {n: statistics.mean(v) for n, v in one.items()}
    two = {n: statistics.mean(v) for n, v in two.items()}
    c0, c1 = fit(one)
    compute = lambda n: c0 + c1 * n  # noqa: E731
    extra = {n: two[n] - one[n] for n in two if n in one}
    a2 = max(0.0, statistics.mean(extra.values()))
    step = lambda w, n: compute(n) + (2 * (w - 1) / w * a2 if w > 1 else 0.0)  # noqa: E731
    out = {
        "calibration": {"c0_ms": c0, "c1_ms_per_particle": c1, "two_gpu_extra_ms": extra, "a2_ms": a2},
        "weak": {n: {w: compute(n) / step(w, n) for w in (2, 4, 8)} for n in (8, 32)},
        "strong": {t: {w: compute(t) / (w * step(w, t / w)) for w in (2, 4, 8)} for t in (64, 256)},
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--fused"]:
        main_fused(sys.argv[2:])
    else:
        main(sys.argv[1:])
