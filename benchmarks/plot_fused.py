# SPDX-License-Identifier: Apache-2.0
"""Figures of BENCHMARKS.md's "Fused step" section from the JSON in
``benchmarks/results/h100x2_fused/``:

    python benchmarks/plot_fused.py   # writes fused_time.png, fused_memory.png, fused_scaling.png there
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


def scaling_figure(out: str) -> None:
    """Weak-scaling efficiency and per-GPU memory against GPUs: measured, and the model's predictions."""
    results = os.path.dirname(HERE)

    def load(path):
        with open(path) as f:
            return json.load(f)

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    one = {int(r["particles_per_gpu"]): r["result"] for r in rows("run9_mlp_whole_1gpu.json")}
    two = {int(r["particles_per_gpu"]): r["result"] for r in rows("run9_mlp_whole_2gpu.json") if r["variant"] == "fused"}
    model = load(os.path.join(HERE, "scaling_model_fused_mlp.json"))
    elbo = {}
    for name in ("h200x4_1gpu.json", "h200x4_2gpu.json", "h200x4_4gpu_sample.json"):
        for r in load(os.path.join(results, name))["rows"]:
            elbo[(r["gpus"], r["particles_per_gpu"])] = r
    for n, color in ((8, "C0"), (32, "C1")):
        ax.plot([1, 2], [1.0, one[n]["step_ms_median"] / two[n]["step_ms_median"]], "s-", color=color,
                label=f"MeanFieldVI, {n}/GPU (H100, measured)")
        ax.plot([2, 4, 8], [model["weak"][str(n)][w] for w in ("2", "4", "8")], "s:", color=color, alpha=0.6,
                label=f"MeanFieldVI, {n}/GPU (model)")
        ws = [w for w in (1, 2, 4) if (w, n) in elbo]
        ax.plot(ws, [elbo[(1, n)]["step_ms_median"] / elbo[(w, n)]["step_ms_median"] for w in ws], "o--",
                color=color, alpha=0.8, label=f"DistributedTrace_ELBO, {n}/GPU (H200, measured)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("weak-scaling efficiency")
    ax.set_ylim(0.8, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Bayesian MLP, particles per GPU fixed", fontsize=10)
    n64 = next(r["result"] for r in rows("run8_mlp_fused_1gpu.json") if r["particles_total"] == 64)
    bx.plot([1, 2], [n64["peak_gib"], two[32]["peak_gib"]], "s-", label="MeanFieldVI (H100)")
    bx.plot([1, 2, 4], [elbo[(w, 64 // w)]["peak_gib"] for w in (1, 2, 4)], "o--", label="DistributedTrace_ELBO (H200)")
    bx.set_xscale("log", base=2)
    bx.set_yscale("log")
    bx.set_xlabel("GPUs")
    bx.set_ylabel("per-GPU peak memory (GiB)")
    bx.grid(True, which="both", alpha=0.3)
    bx.legend(fontsize=8)
    bx.set_title("Bayesian MLP, N = 64 split over the GPUs", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, out), dpi=120)


if __name__ == "__main__":
    scaling_figure("fused_scaling.png")
    figure("step_ms_median", "step time (ms)", "fused_time.png")
    figure("peak_gib", "peak memory (GiB)", "fused_memory.png")
