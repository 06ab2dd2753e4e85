# SPDX-License-Identifier: Apache-2.0
"""Every benchmark suite runs once in its tiny configuration through
``pyro-sp bench`` (CPU; the numbers are not checked, the code paths are, and
so is the accounting of every kind of collective), the one timing loop is
checked directly, and the peers' scripts in benchmarks/ run when their
libraries are installed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from pyro_sp.bench import format_result
from pyro_sp.bench.timing import COLLECTIVE_KINDS, back_to_back_times, graph_pool_bytes, step_times, timed
from pyro_sp.distributed.launch import start_module

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


def test_timing_loop():
    calls = []
    times, peak = step_times(lambda: calls.append(1) or len(calls), warmup=2, steps=3,
                             wait=lambda r: calls.append(-r), before=lambda: calls.append(0))
    assert len(times) == 3 and all(t >= 0 for t in times) and peak is None
    # warm-up steps untimed (each waited for), then before / step / wait per timed step
    assert calls == [1, -1, 1, -3, 0, 1, -6, 0, 1, -9, 0, 1, -12]
    assert set(timed(lambda: None, steps=2)) == {"step_ms_median"}  # no peak memory off CUDA
    with pytest.raises(ValueError, match="Expected a CUDA device with events=True"):
        step_times(lambda: None, steps=1, events=True)


def test_graph_pools_off_cuda():
    """Off CUDA no graph holds memory: the peak is the allocated peak alone (None off CUDA)."""
    assert graph_pool_bytes(None) == 0 and graph_pool_bytes(torch.device("cpu")) == 0
    assert "graph_pool_gib" not in timed(lambda: None, steps=2, device=torch.device("cpu"))


def test_back_to_back_rounds_wait_once_per_round():
    """Back to back: the steps of a round run without a wait between them; the round's last result is
    waited for once; one time per round, per step."""
    calls = []
    times = back_to_back_times(lambda: calls.append(1) or len(calls), steps=3, rounds=2,
                               wait=lambda r: calls.append(-r))
    assert calls == [1, 1, 1, -3, 1, 1, 1, -7] and len(times) == 2 and all(t >= 0 for t in times)
    slow = back_to_back_times(lambda: time.sleep(0.002), steps=4, rounds=1)
    assert slow[0] >= 0.002  # seconds per step, not per round
    cell = timed(lambda: None, steps=2, back_to_back=3)
    assert set(cell) == {"step_ms_median", "step_ms_back_to_back"}
    assert "back to back" in format_result({"suite": "gpu-single", "model": "mlp",
                                            "rows": [{"particles": 8, "fused": {**cell, "peak_gib": 0.5}}]})
    with pytest.raises(ValueError, match="at least one round"):
        back_to_back_times(lambda: None, steps=0, rounds=2)
    with pytest.raises(ValueError, match="back_to_back >= 0"):
        timed(lambda: None, steps=1, back_to_back=-1)


@pytest.mark.parametrize("argv", [["single", "--back-to-back", "-1"], ["scaling", "--back-to-back", "2"],
                                  ["memory", "--back-to-back", "2"]])
def test_back_to_back_only_for_the_single_suite(argv, capsys):
    from pyro_sp.bench import gpu

    with pytest.raises(SystemExit):
        gpu.run(argv + ["--tiny", "--device", "cpu"])
    assert "--back-to-back ROUNDS >= 1 with the suite 'single' only" in capsys.readouterr().err


def test_write_result_marks_partial_rows_and_the_whole_result_replaces_them(tmp_path):
    from pyro_sp.bench import write_result

    path = tmp_path / "sub" / "r.json"
    write_result(str(path), {"rows": [1]}, partial=True)  # as a run goes
    assert json.loads(path.read_text()) == {"rows": [1], "partial": True}
    write_result(str(path), {"rows": [1, 2]})  # at its end
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    write_result(None, {"rows": [3]}, partial=True)  # no --out: nothing written, no error
    assert json.loads(path.read_text()) == {"rows": [1, 2]}


def test_overhead(tmp_path):
    r = bench("overhead", "--tiny", tmp_path=tmp_path)
    assert r["ratio_median"] > 0


def test_cpu_scaling(tmp_path):
    r = bench("cpu-scaling", "--tiny", "--nproc", "2", tmp_path=tmp_path)
    assert set(r["median_step_s"]) == {
        "one_process_1_thread", "one_process_2_threads", "2_ranks_1_thread", "2_independent_shares_1_thread"
    }
    per_step = r["collectives_per_step"]  # every kind listed, the ones the estimator's step runs counted
    assert set(COLLECTIVE_KINDS) <= set(per_step)
    assert per_step["all_reduce_gradients"]["collectives"] == 1 and per_step["step_check"]["collectives"] == 1
    assert per_step["bucketed_gradients"]["collectives"] == 0


def test_cpu_step_lists_every_collective(tmp_path):
    r = bench("cpu-step", "--tiny", "--nproc", "2", tmp_path=tmp_path)
    assert r["world_size"] == 2 and set(COLLECTIVE_KINDS) <= set(r["per_step"])
    assert {k for k, v in r["per_step"].items() if v["collectives"]} == {"all_reduce_gradients", "step_check"}


def test_sync(tmp_path):
    r = bench("sync", "--tiny", tmp_path=tmp_path)
    assert r["world_size"] == 2 and set(r["reduction_s"]) == {
        "pyro_sp_flat_all_reduce", "ddp_mean_hook", "ddp_sum_hook"
    }
    # the two strategies of pyro_sp.distributed.gradients, each one collective here
    assert set(r["collectives_per_step"]["pyro_sp_flat_all_reduce"]) == {"all_reduce_gradients"}
    assert set(r["collectives_per_step"]["ddp_sum_hook"]) == {"bucketed_gradients"}


@pytest.mark.parametrize("model", ["mlp", "vit"])
def test_gpu_single_on_cpu(tmp_path, model):
    variants = ["pyro", "pyro_sp", "fused_eager"] + (["fused", "pyro_primitives", "pyro_sp_primitives",
                                                      "pyro_sp_compiled_native", "pyro_sp_compiled_grouped"] if model == "mlp" else [])
    r = bench("gpu-single", "--tiny", "--device", "cpu", "--model", model, "--particles", "2",
              "--variants", *variants, *(["--fused-adam"] if model == "mlp" else []), tmp_path=tmp_path)
    row = r["rows"][0]
    assert all(row[v]["step_ms_median"] > 0 for v in variants)
    assert r["fused_adam"] == (model == "mlp") and "partial" not in r  # the whole result, not the rows so far


def test_fused_adam_reaches_the_optimizer(monkeypatch):
    from pyro_sp.bench.gpu import make_step, problem

    seen = []

    class Recording(torch.optim.Adam):
        def __init__(self, params, **kwargs):
            seen.append(kwargs.get("fused"))
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", Recording)
    net, x, y = problem("mlp", True, torch.device("cpu"))
    for fused in (False, True):
        make_step("fused_eager", net, x, y, 2, fused_adam=fused)()
    assert seen == [None, True]


def test_gpu_scaling_on_cpu(tmp_path):
    r = bench("gpu-scaling", "--nproc", "2", "--tiny", "--device", "cpu", "--particles", "4", "--per-gpu", "2",
              "--variants", "fused_eager", "pyro_sp", tmp_path=tmp_path)
    assert {(row["variant"], row["scaling"], row["grid"]) for row in r["rows"]} == {
        ("fused_eager", "strong", "2x1"), ("pyro_sp", "strong", "2x1"),
        ("fused_eager", "weak", "2x1"), ("pyro_sp", "weak", "2x1"),
    }
    assert all(isinstance(row["result"], dict) for row in r["rows"])
    for row in r["rows"]:
        counted = {k for k, v in row["result"]["collectives_per_step"].items() if v["collectives"]}
        assert set(COLLECTIVE_KINDS) <= set(row["result"]["collectives_per_step"])
        assert counted == ({"bucketed_gradients", "loss_sum"} if row["variant"] == "fused_eager"
                           else {"all_reduce_gradients", "step_check"})


COMPILED_VARIANTS = ["pyro", "pyro_jit", "pyro_sp", "pyro_sp_compiled", "pyro_grouped", "pyro_sp_compiled_grouped",
                     "pyro_sp_compiled_graphs"]
FAILED = re.compile(r"^failed: \w+: ")


def test_compiled_on_cpu(tmp_path):
    r = bench("compiled", "--tiny", "--device", "cpu", "--programs", "small", "gmm",
              "--variants", *COMPILED_VARIANTS, tmp_path=tmp_path)
    assert r["suite"] == "compiled" and r["device"] == "cpu" and r["warmup"] >= 4
    assert [(row["program"], row["particles"]) for row in r["rows"]] == [("small", 8), ("gmm", 1)]
    for row in r["rows"]:
        # CUDA graphs are skipped on a CPU; every other cell is a timing dict
        assert row["pyro_sp_compiled_graphs"].startswith("skipped: ")
        for variant in COMPILED_VARIANTS[:-1]:
            cell = row[variant]
            assert isinstance(cell, dict), (row["program"], variant, cell)
            assert cell["step_ms_median"] > 0 and "peak_gib" not in cell
            assert cell["speedup_vs_eager"] > 0 and cell["speedup_vs_jit"] > 0
            assert ("compile_s" in cell) == (variant in ("pyro_jit", "pyro_sp_compiled", "pyro_sp_compiled_grouped"))
            assert "fallback" not in cell or variant.startswith("pyro_sp_compiled")
        assert row["pyro"]["speedup_vs_eager"] == 1.0 and row["pyro_jit"]["speedup_vs_jit"] == 1.0


def test_compiled_records_failures(tmp_path):
    # Pyro's JIT may fail on BayesianModule models: a failure is a cell, not a crash
    r = bench("compiled", "--tiny", "--device", "cpu", "--programs", "mlp", "--variants", "pyro", "pyro_jit",
              tmp_path=tmp_path)
    row = r["rows"][0]
    assert row["program"] == "mlp" and isinstance(row["pyro"], dict)
    assert isinstance(row["pyro_jit"], dict) or FAILED.match(row["pyro_jit"]), row["pyro_jit"]
    if isinstance(row["pyro_jit"], str):
        assert row["pyro"]["speedup_vs_jit"] is None


def test_compiled_failure_format(monkeypatch):
    from types import SimpleNamespace

    import torch

    from pyro_sp.bench import compiled

    def broken(name, tiny, device):
        raise ValueError("Expected something.\nMore detail.")

    monkeypatch.setattr(compiled, "build", broken)
    args = SimpleNamespace(tiny=True, warmup=4, steps=1)
    cell = compiled.attempt("pyro", "small", 1, args, torch.device("cpu"))
    assert cell == "failed: ValueError: Expected something."


def test_memory_needs_cuda(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pyro_sp.cli", "bench", "gpu-memory", "--tiny", "--device", "cpu"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "CUDA" in proc.stderr


def test_unknown_suite():
    proc = subprocess.run([sys.executable, "-m", "pyro_sp.cli", "bench", "nope"], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "expected a suite" in proc.stderr


def _script(module, *args, tmp_path, torchrun: bool = False) -> dict:
    """Run ``benchmarks/<module>.py`` alone, or on 2 ranks (through pyro_sp's launcher)."""
    out = tmp_path / "peer.json"
    proc = start_module(f"benchmarks.{module}", list(args) + ["--out", str(out)], nproc=2 if torchrun else None,
                        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    with open(out) as f:
        return json.load(f)


@pytest.mark.parametrize("model", ["mlp", "vit"])
def test_torch_blue_peer(tmp_path, model):
    pytest.importorskip("torch_blue")
    r = _script("torch_blue_bench", "single", "--model", model, "--tiny", "--device", "cpu",
                "--particles", "2", tmp_path=tmp_path)
    assert r["rows"][0]["torch_blue"]["step_ms_median"] > 0


def test_torch_blue_paper_mode(tmp_path):
    pytest.importorskip("torch_blue")
    r = _script("torch_blue_bench", "paper", "--model", "mlp", "--tiny", "--device", "cpu",
                "--per-gpu", "2", tmp_path=tmp_path, torchrun=True)
    assert r["rows"][0]["torch_blue"]["step_ms_median"] > 0


def test_numpyro_vit_peer(tmp_path):
    pytest.importorskip("numpyro")
    r = _script("numpyro_vit", "--tiny", "--particles", "2", "--warmup", "1", "--steps", "2",
                tmp_path=tmp_path)
    assert r["rows"][0]["numpyro_jit"]["step_ms_median"] > 0
