# SPDX-License-Identifier: Apache-2.0
"""Every benchmark suite runs once in its tiny configuration through
``pyro-sp bench`` (CPU; the numbers are not checked, the code paths are), and
the peers' scripts in benchmarks/ run when their libraries are installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def bench(*args, tmp_path) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_sp.cli", "bench", *args, "--out", str(out)],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "-+-" in proc.stdout or '"suite"' in proc.stdout, proc.stdout  # a table (or the summary) was printed
    with open(out) as f:
        return json.load(f)


def test_overhead(tmp_path):
    r = bench("overhead", "--tiny", tmp_path=tmp_path)
    assert r["ratio_median"] > 0


def test_cpu_scaling(tmp_path):
    r = bench("cpu-scaling", "--tiny", "--nproc", "2", tmp_path=tmp_path)
    assert set(r["median_step_s"]) == {
        "one_process_1_thread", "one_process_2_threads", "2_ranks_1_thread", "2_independent_shares_1_thread"
    }


def test_sync(tmp_path):
    r = bench("sync", "--tiny", tmp_path=tmp_path)
    assert r["world_size"] == 2 and set(r["reduction_s"]) == {
        "pyro_sp_flat_all_reduce", "ddp_mean_hook", "ddp_sum_hook"
    }


@pytest.mark.parametrize("model", ["mlp", "vit"])
def test_gpu_single_on_cpu(tmp_path, model):
    variants = ["pyro", "pyro_sp", "fused_eager"] + (["fused"] if model == "mlp" else [])
    r = bench("gpu-single", "--tiny", "--device", "cpu", "--model", model, "--particles", "2",
              "--variants", *variants, tmp_path=tmp_path)
    row = r["rows"][0]
    assert all(row[v]["step_ms_median"] > 0 for v in variants)


def test_gpu_scaling_on_cpu(tmp_path):
    r = bench("gpu-scaling", "--nproc", "2", "--tiny", "--device", "cpu", "--particles", "4", "--per-gpu", "2",
              "--variants", "fused_eager", "pyro_sp", tmp_path=tmp_path)
    assert {(row["variant"], row["scaling"], row["grid"]) for row in r["rows"]} == {
        ("fused_eager", "strong", "2x1"), ("pyro_sp", "strong", "2x1"),
        ("fused_eager", "weak", "2x1"), ("pyro_sp", "weak", "2x1"),
    }
    assert all(isinstance(row["result"], dict) for row in r["rows"])


def test_memory_needs_cuda(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pyro_sp.cli", "bench", "gpu-memory", "--tiny", "--device", "cpu"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "CUDA" in proc.stderr


def test_unknown_suite():
    proc = subprocess.run([sys.executable, "-m", "pyro_sp.cli", "bench", "nope"], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "expected a suite" in proc.stderr


def _script(*args, tmp_path, torchrun: bool = False) -> dict:
    out = tmp_path / "peer.json"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] if torchrun \
        else [sys.executable]
    proc = subprocess.run(launcher + list(args) + ["--out", str(out)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("model", ["mlp", "vit"])
def test_torch_blue_peer(tmp_path, model):
    pytest.importorskip("torch_blue")
    r = _script("benchmarks/torch_blue_bench.py", "single", "--model", model, "--tiny", "--device", "cpu",
                "--particles", "2", tmp_path=tmp_path)
    assert r["rows"][0]["torch_blue"]["step_ms_median"] > 0


def test_torch_blue_paper_mode(tmp_path):
    pytest.importorskip("torch_blue")
    r = _script("benchmarks/torch_blue_bench.py", "paper", "--model", "mlp", "--tiny", "--device", "cpu",
                "--per-gpu", "2", tmp_path=tmp_path, torchrun=True)
    assert r["rows"][0]["torch_blue"]["step_ms_median"] > 0


def test_numpyro_vit_peer(tmp_path):
    pytest.importorskip("numpyro")
    r = _script("benchmarks/numpyro_vit.py", "--tiny", "--particles", "2", "--warmup", "1", "--steps", "2",
                tmp_path=tmp_path)
    assert r["rows"][0]["numpyro_jit"]["step_ms_median"] > 0
