# SPDX-License-Identifier: Apache-2.0
"""The Pyro conformance harness (benchmarks/pyro_conformance.py) on a tiny stand-in checkout."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "benchmarks", "pyro_conformance.py")

SETUP_CFG = """\
[tool:pytest]
filterwarnings = error
"""

# Written like Pyro's own tests: the estimator is imported at module top.
TINY_TESTS = '''\
import warnings

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

DATA = torch.tensor([0.5, 1.0, 1.5])


def model():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(DATA)):
        pyro.sample("x", dist.Normal(z, 1.0), obs=DATA)


def guide():
    loc = pyro.param("loc", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale))


def test_loss_is_finite():
    loss = Trace_ELBO(num_particles=4).loss(model, guide)
    assert torch.isfinite(torch.tensor(loss))


def test_seed_reproduces_loss():
    elbo = Trace_ELBO(num_particles=4)
    pyro.set_rng_seed(0)
    first = elbo.loss(model, guide)
    pyro.set_rng_seed(0)
    assert elbo.loss(model, guide) == first


@pytest.mark.parametrize("Elbo", [Trace_ELBO])
def test_svi_step_creates_params(Elbo):
    svi = SVI(model, guide, Adam({"lr": 0.01}), Elbo(num_particles=4))
    svi.step()
    assert set(pyro.get_param_store().keys()) == {"loc", "scale"}


def test_fails_everywhere():
    assert False, "expected failure"


def test_warnings_are_errors():
    warnings.warn("an error under the checkout's filterwarnings", UserWarning)


def test_skipped():
    pytest.skip("not counted")


@pytest.mark.xfail(reason="not counted")
def test_xfailed():
    assert False
'''


def _torchrun_available() -> bool:
    return importlib.util.find_spec("torch.distributed.run") is not None


@pytest.mark.skipif(not _torchrun_available(), reason="torch.distributed.run is unavailable")
def test_harness_on_tiny_checkout(tmp_path):
    src = tmp_path / "pyro-src"
    (src / "tests" / "infer").mkdir(parents=True)
    (src / "setup.cfg").write_text(SETUP_CFG)
    (src / "tests" / "__init__.py").write_text("")
    (src / "tests" / "infer" / "__init__.py").write_text("")
    (src / "tests" / "infer" / "test_tiny.py").write_text(textwrap.dedent(TINY_TESTS))
    out = tmp_path / "out"
    cmd = [
        sys.executable, DRIVER, "--pyro-src", str(src), "--nproc", "2", "--out", str(out),
        "--quiet", "--timeout-per-file", "90", "--collective-timeout", "30", "tests/infer/test_tiny.py",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    report = json.loads((out / "report.json").read_text())
    entry = report["files"]["tests/infer/test_tiny.py"]
    ref = entry["reference"]
    # Three pass; the failing test and the warning (an error only under the
    # checkout's filterwarnings) fail; skip and xfail are not counted.
    assert ref["passed"] == 3
    assert ref["outcomes"] == {"passed": 3, "failed": 2, "skipped": 1, "xfailed": 1}
    assert ref["counted"] == 5

    run = entry["runs"]["2"]
    assert run["swapped"]["Trace_ELBO"][0] == "pyro.infer"
    assert "pyro.infer.trace_elbo" in run["swapped"]["Trace_ELBO"]
    assert run["mesh"].startswith("SPMesh(sample=2, data=1")
    assert run["ranks_reported"] == [0, 1] and run["ranks_complete"] == [0, 1]
    assert not run["timed_out"]
    assert run["passed_of_reference"] == 3, run["regressions"]
    assert run["regressions"] == []
    assert run["outcomes"] == {"passed": 3, "failed": 2, "skipped": 1, "xfailed": 1}

    # Per-rank results exist and were merged; rank 1 wrote nothing to the terminal.
    for rank in (0, 1):
        data = json.loads((out / "w2" / "tests_infer_test_tiny" / f"rank{rank}.json").read_text())
        assert data["world_size"] == 2 and data["rank"] == rank and data["swap"]
        assert data["tests"]["tests/infer/test_tiny.py::test_fails_everywhere"]["outcome"] == "failed"
        assert "expected failure" in data["tests"]["tests/infer/test_tiny.py::test_fails_everywhere"]["crash"]
    reference = json.loads((out / "reference" / "tests_infer_test_tiny" / "rank0.json").read_text())
    assert reference["swapped"] == {} and not reference["distributed"]

    # The class in the parametrized id is the swapped one; the report uses the reference's id.
    data = json.loads((out / "w2" / "tests_infer_test_tiny" / "rank0.json").read_text())
    assert "tests/infer/test_tiny.py::test_svi_step_creates_params[DistributedTrace_ELBO]" in data["tests"]

    md = (out / "report.md").read_text()
    assert "| tests/infer/test_tiny.py | 3 (" in md
    assert "3/3" in md
