# SPDX-License-Identifier: Apache-2.0
"""Print a markdown table of the tutorials' results: one process against 2 ranks, per seed.

    python tutorials/summarize.py [RESULTS_DIR]     # default tutorials/results
"""

from __future__ import annotations

import glob
import json
import os
import sys

# tutorial -> (the headline numbers, as (label, key) pairs)
HEADLINES = {
    "svi_part_i_coin": [("posterior mean (exact 0.533)", "mean"), ("posterior sd (exact 0.090)", "std")],
    "svi_part_iii_baselines": [
        ("posterior mean", "mean"),
        ("gradient sd without baseline", "grad_std_without_baseline"),
        ("with baseline", "grad_std_with_baseline"),
    ],
    "bayesian_regression": [("90 % interval coverage", "coverage_90"), ("sigma", "sigma")],
    "vae": [("held-out NLL bound, ELBO-trained", "ELBO_test_nll_bound"), ("IWAE-trained", "IWAE_test_nll_bound")],
    "gmm": [("final loss (Pyro: 17.44)", "final_loss"), ("larger weight (Pyro: 0.625)", "weights")],
    "flow_guide": [("-ELBO per point, flow", "flow_neg_elbo"), ("AutoNormal", "autonormal_neg_elbo")],
    "forecasting": [("CRPS (standardised)", "crps"), ("90 % coverage", "coverage_90")],
    "augmentation_diversity": [
        ("digits epochs to NLL 0.25, (d) - (c)", "summary/digits/d - c (paired)/epochs_to_nll"),
        ("final NLL, (d) - (c)", "summary/digits/d - c (paired)/final_nll"),
        ("sunspots final NLL, (d) - (c)", "summary/sunspots/d - c (paired)/final_nll"),
    ],
    "bnn_digits": [("CNN accuracy", "results/CNN general/accuracy"), ("CNN AUROC on unseen 8 and 9", "results/CNN general/auroc_unseen")],
}
SECONDS = ("seconds", "total_seconds", "train_seconds", "ELBO_seconds", "flow_seconds", "results/CNN general/seconds")


def _get(record: dict, key: str):
    value = record
    for part in key.split("/"):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, list) and key.startswith("summary/"):
        return f"{value[0]:.3f} ± {value[1]:.3f}"  # (mean, half-width of its 95 % interval)
    if isinstance(value, list):
        value = max(value)
    return value


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def main(folder: str) -> None:
    records = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            record = json.load(f)
        if not record.get("smoke"):
            records.append(record)
    print("| tutorial | ranks (sample × data) | seed | " + " | ".join(["result", "", ""]) + " | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, headline in HEADLINES.items():
        rows = sorted((r for r in records if r["tutorial"] == name), key=lambda r: (r["seed"], r["world_size"], r["mesh"]))
        for r in rows:
            cells = [f"{label}: {_fmt(_get(r, key))}" for label, key in headline] + [""] * (3 - len(headline))
            seconds = next((_get(r, k) for k in SECONDS if _get(r, k) is not None), None)
            print(f"| `{name}` | {r['world_size']} ({r['mesh']}) | {r['seed']} | " + " | ".join(cells) + f" | {_fmt(seconds)} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
