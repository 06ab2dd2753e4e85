# SPDX-License-Identifier: Apache-2.0
"""Figures of BENCHMARKS.md's "Fused step" section from the JSON in
``benchmarks/results/h100x2_fused/``:

    python benchmarks/plot_fused.py   # writes fused_time.png and fused_memory.png there
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "h100x2_fused")


def rows(name: str) -> list[dict]:
    path = os.path.join(HERE, name)
    if name.endswith(".jsonl"):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    with open(path) as f:
        return json.load(f)["rows"]


def series(table: list[dict], key: str, field: str):
    pts = [(r["particles"], r[key][field]) for r in table if isinstance(r.get(key), dict) and field in r[key]]
    return [p[0] for p in pts], [p[1] for p in pts]


MLP = [  # (label, file, key, style)
    ("Pyro Trace_ELBO", "run7_mlp_single.json", "pyro", "o-"),
    ("MeanFieldVI (compiled)", "run7_mlp_single.json", "fused", "s-"),
    ("MeanFieldVI, analytic KL", "run7_mlp_single.json", "fused_analytic", "s--"),
    ("raw torch, compiled", "run7_mlp_raw_torch.json", "raw_torch_compile", "^-"),
    ("NumPyro (fp32)", "run7_mlp_numpyro_fp32.json", "numpyro_jit", "v-"),
    ("torch_blue *", "run5_mlp_torch_blue.json", "torch_blue", "d:"),
]
VIT = [
    ("Pyro Trace_ELBO", "run7_vit_single.json", "pyro", "o-"),
    ("MeanFieldVI (compiled)", "run7_vit_single.json", "fused", "s-"),
    ("torch_blue *", "run5_vit_torch_blue.json", "torch_blue", "d:"),
]


def figure(field: str, ylabel: str, out: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, title, spec in ((axes[0], "Bayesian MLP 3072-2048-2048-10, batch 256", MLP),
                            (axes[1], "Bayesian ViT-small (CIFAR shapes), batch 128", VIT)):
        for label, name, key, style in spec:
            x, y = series(rows(name), key, field)
            if x:
                ax.plot(x, y, style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("particles N")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("One NVIDIA H100, fp32 (* torch_blue: same GPU type, another sitting)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, out), dpi=120)


if __name__ == "__main__":
    figure("step_ms_median", "step time (ms)", "fused_time.png")
    figure("peak_gib", "peak memory (GiB)", "fused_memory.png")
