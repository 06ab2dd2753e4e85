# SPDX-License-Identifier: Apache-2.0
"""Hybrid training end to end: sharded data, per-rank augmentation,
checkpoint/resume, NaN stop, the elastic restart, and the pyro-sp command."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import textwrap

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as tdist
from pyro.infer import SVI
from pyro.infer.autoguide import AutoNormal

import pyro_sp
from pyro_sp import train as train_module
from pyro_sp.checkpoint import load_checkpoint
from pyro_sp.cli import main as cli_main
from pyro_sp.data import Augmenter, ShardedBatchSampler, load_digits, load_sunspots
from pyro_sp.train import MetricsLog, fit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- sharding and augmentation --------------------------------------------------------
def sampler_batches(sample: int, data: int, num_items: int, batch: int):
    mesh = pyro_sp.SPMesh(sample=sample, data=data)
    sampler = ShardedBatchSampler(num_items, batch, mesh=mesh, seed=3)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        epochs.append([b.tolist() for b in sampler])
    return mesh.sample_index, mesh.data_index, epochs


@pytest.mark.parametrize("sample,data,num_items,batch", [(2, 2, 103, 10), (1, 3, 50, 7), (3, 1, 20, 6), (1, 2, 5, 1)])
def test_data_groups_partition_each_epoch(pools, sample, data, num_items, batch):
    results = pools(sample * data).run(sampler_batches, sample, data, num_items, batch)
    by_group = {}
    for s, d, epochs in results:
        if d in by_group:
            assert epochs == by_group[d], "ranks of one sample group got different batches"
        by_group[d] = epochs
    lengths = {len(e) for epochs in by_group.values() for e in epochs}
    assert len(lengths) == 1, "data groups would take different numbers of steps"
    for epoch in range(2):
        seen = [i for d in by_group for b in by_group[d][epoch] for i in b]
        assert sorted(seen) == list(range(num_items)), "not a partition of the data set"
        # no empty batch; one item more than batch_size only when a shard has fewer items than batches
        tiny = num_items // data < math.ceil(math.ceil(num_items / data) / batch)
        assert all(1 <= len(b) <= batch + tiny for d in by_group for b in by_group[d][epoch])
    if data == 1:
        return
    assert by_group[0][0] != by_group[0][1], "epochs were not reshuffled"


def augmented(independent: bool):
    mesh = pyro_sp.SPMesh(sample=2, data=2)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    first = Augmenter(mesh=mesh, seed=5, independent=independent)(x)
    again = Augmenter(mesh=mesh, seed=5, independent=independent)(x)
    return mesh.sample_index, mesh.data_index, first, torch.equal(first, again)


@pytest.mark.parametrize("independent", [True, False])
def test_augmentation_streams(pools, independent):
    results = {(s, d): (out, same) for s, d, out, same in pools(4).run(augmented, independent)}
    assert all(same for _, same in results.values()), "augmentation not reproducible from the seed"
    for d in range(2):
        equal = torch.equal(results[(0, d)][0], results[(1, d)][0])
        assert equal != independent
    assert not torch.equal(results[(0, 0)][0], results[(0, 1)][0])


def test_bundled_data_sets():
    from sklearn.datasets import load_digits as sklearn_digits
    from statsmodels.datasets import sunspots

    digits = load_digits(images=True)
    reference = sklearn_digits()
    assert digits.x_train.shape[1:] == (1, 8, 8) and len(digits.x_train) + len(digits.x_test) == 1797
    # every image of scikit-learn's set, scaled by 1/16, once: the same pixels and labels, split
    pixels = torch.cat([digits.x_train, digits.x_test]).reshape(-1, 64) * 16
    ours = sorted(map(tuple, torch.cat([pixels, torch.cat([digits.y_train, digits.y_test]).unsqueeze(-1)], 1).tolist()))
    theirs = sorted(map(tuple, torch.cat([torch.tensor(reference.data, dtype=torch.float32),
                                          torch.tensor(reference.target).unsqueeze(-1)], 1).tolist()))
    assert ours == theirs
    sun = load_sunspots(window=12)
    series = torch.tensor(sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(), dtype=torch.float32)
    assert sun.x_train.shape[1] == 12 and len(sun.x_train) + len(sun.x_test) == len(series) - 12
    # standardised with the training years' mean and deviation, in time order (a forecast split)
    cut = int(len(series) * 0.8)  # the first 80 % of the years (test_fraction=0.2)
    z = (series - series[:cut].mean()) / series[:cut].std()
    assert torch.allclose(sun.x_train[0], z[:12]) and torch.allclose(sun.y_test[-1], z[-1])
    # the windows are the series itself: the target of one window starts the next
    assert torch.equal(sun.x_train[1, -1], sun.y_train[0])


# ---- checkpoint and resume --------------------------------------------------------------
X = torch.linspace(-1, 1, 40).unsqueeze(-1) * torch.tensor([1.0, -0.5, 2.0])


def _regression(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    with pyro.plate("data", 40, subsample=torch.arange(x.shape[0])):
        pyro.sample("y", dist.Normal((x * w).sum(-1), 0.5), obs=y)


def run_training(steps_total: int, checkpoint: str | None, stop_after: int | None, data: int = 1, kind: str = "regression"):
    """Train for steps_total steps (or stop after stop_after, checkpointing there); return the params."""
    world = tdist.get_world_size()
    mesh = pyro_sp.SPMesh(sample=world // data, data=data)
    y = (X * torch.tensor([0.5, 1.0, -1.0])).sum(-1)
    pyro.set_rng_seed(1)
    if kind == "tracegraph":  # decaying-average baselines: per-rank state of uneven shape (7 = 4 + 3)
        from tests.test_estimators import tg_guide, tg_model

        model, guide = (lambda x, y: tg_model(y)), (lambda x, y: tg_guide(y))
        elbo = pyro_sp.DistributedTraceGraph_ELBO(vectorize_particles=True, num_particles=7, mesh=mesh)
    else:
        model, guide = _regression, AutoNormal(_regression)
        elbo = pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=6, mesh=mesh)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=elbo)
    sampler = ShardedBatchSampler(40, 8, mesh=mesh, seed=2)
    epochs = steps_total // len(sampler)
    stopper = None
    if stop_after is not None:
        def stopper(step):
            if step == stop_after:
                raise KeyboardInterrupt  # a crash right after the checkpoint at this step

    try:
        result = fit(svi, sampler, lambda idx: (X[idx], y[idx]), epochs=epochs, mesh=mesh, elbo=elbo,
                     checkpoint=checkpoint, checkpoint_every=stop_after or 0, progress=False, on_step=stopper)
    except KeyboardInterrupt:
        return None
    params = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
    return params, result["resumed_from"]


@pytest.mark.parametrize("data,kind", [(1, "regression"), (2, "regression"), (1, "tracegraph")],
                         ids=["sample2", "data2", "tracegraph-baselines"])
def test_resume_is_bit_identical(pools, tmp_path, data, kind):
    pool = pools(2)
    path = str(tmp_path / f"ckpt{data}{kind}.pt")
    straight = pool.run(run_training, 30, None, None, data, kind)
    assert pool.run(run_training, 30, path, 13, data, kind) == [None, None]  # stops mid-epoch after step 13
    resumed = pool.run(run_training, 30, path, None, data, kind)
    assert [r[1] for r in straight] == [None, None] and [r[1] for r in resumed] == [13, 13]
    straight, resumed = [r[0] for r in straight], [r[0] for r in resumed]
    for a, b in zip(straight, resumed):
        assert a.keys() == b.keys()
        for n in a:
            assert torch.equal(a[n], b[n]), n


def mean_field_training(steps_total: int, checkpoint: str | None, stop_after: int | None, data: int, log: str | None):
    """MeanFieldVI driven by fit (sample x data mesh), stopped and resumed like run_training."""
    from pyro_sp.nn import BayesianModule, MeanFieldVI
    from pyro_sp.train import MetricsLog

    world = tdist.get_world_size()
    mesh = pyro_sp.SPMesh(sample=world // data, data=data)
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    vi = MeanFieldVI(BayesianModule(net), num_particles=5, num_data=40, mesh=mesh, seed=4, check="always")
    opt = torch.optim.Adam(vi.parameters(), lr=0.05)
    x, labels = X.to(torch.get_default_dtype()), (X[:, 0] > 0).long()
    sampler = ShardedBatchSampler(40, 8, mesh=mesh, seed=2)
    stopper = None
    if stop_after is not None:
        def stopper(step):
            if step == stop_after:
                raise KeyboardInterrupt

    try:
        result = fit(lambda x, y: vi.step(opt, x, y), sampler, lambda idx: (x[idx], labels[idx]),
                     epochs=steps_total // len(sampler), mesh=mesh, objects={"vi": vi, "optimizer": opt},
                     checkpoint=checkpoint, checkpoint_every=stop_after or 0, progress=False, on_step=stopper,
                     log=MetricsLog(log, mesh=mesh))
    except KeyboardInterrupt:
        return None
    state = {k: v.detach().clone() for k, v in vi.state_dict().items() if isinstance(v, torch.Tensor)}
    moments = {f"adam.{i}.{k}": v.clone() for i, st in opt.state_dict()["state"].items()
               for k, v in st.items() if isinstance(v, torch.Tensor)}
    return {**state, **moments}, result["resumed_from"], result["loss"], vi.state_dict()["_extra_state"]


@pytest.mark.parametrize("data", [1, 2], ids=["sample2", "data2"])
def test_mean_field_fit_resume_is_bit_identical(pools, tmp_path, data):
    pool = pools(2)
    path, log = str(tmp_path / "vi.pt"), str(tmp_path / "metrics.jsonl")
    straight = pool.run(mean_field_training, 20, None, None, data, None)
    assert pool.run(mean_field_training, 20, path, 7, data, log) == [None, None]  # stops mid-epoch after step 7
    resumed = pool.run(mean_field_training, 20, path, None, data, log)
    assert [r[1] for r in straight] == [None, None] and [r[1] for r in resumed] == [7, 7]
    for a, b in zip(straight, resumed):
        assert a[3] == b[3] and a[3]["steps"] > 7  # the step count that keys the particle streams
        assert a[2] == b[2] and math.isfinite(a[2])  # the last loss, bit for bit
        assert a[0].keys() == b[0].keys() and any(k.startswith("adam.") for k in a[0])
        for n in a[0]:
            assert torch.equal(a[0][n], b[0][n]), n
    with open(log) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, straight[0][3]["steps"] + 1))  # the resumed run continues it
    assert records[-1]["loss"] == straight[0][2]


def mean_field_nan():
    from pyro_sp.nn import BayesianModule, MeanFieldVI

    mesh = pyro_sp.SPMesh(sample=2)
    vi = MeanFieldVI(BayesianModule(torch.nn.Linear(3, 2)), num_particles=2, mesh=mesh, seed=0)
    opt = torch.optim.SGD(vi.parameters(), lr=0.1)
    x = X.to(torch.get_default_dtype())
    x[5] = float("nan")
    fit(lambda x, y: vi.step(opt, x, y), ShardedBatchSampler(40, 10, mesh=mesh, shuffle=False),
        lambda idx: (x[idx], torch.zeros(len(idx), dtype=torch.long)), epochs=1, mesh=mesh, progress=False)


def test_mean_field_nan_loss_stops_every_rank(pools):
    errors = pools(2).run_expecting_errors(mean_field_nan)
    assert sorted(errors) == [0, 1]
    for kind, msg, _ in errors.values():
        assert kind == "FloatingPointError" and "The loss is nan at step 1 (epoch 0)" in msg


def nan_training():
    mesh = pyro_sp.SPMesh(sample=2)

    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(w * x[:, 0] * float("nan"), 1.0), obs=y)

    pyro.enable_validation(False)
    svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.1}), loss=pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=2, mesh=mesh))
    fit(svi, ShardedBatchSampler(40, 10, mesh=mesh), lambda idx: (X[idx], X[idx, 0]), epochs=1, mesh=mesh, progress=False)


def test_nan_loss_stops_every_rank(pools):
    for kind, msg, _ in pools(2).run_expecting_errors(nan_training).values():
        assert kind == "FloatingPointError" and "at step 1 (epoch 0)" in msg  # steps counted from 1, as MeanFieldVI and the metrics log count


# ---- a loss read one step late (what fit does with a CUDA loss), on the CPU ---------------
class LateReading(train_module._LossReading):
    """A CPU loss read when asked rather than at once: fit's loop as it runs with a CUDA loss (the
    device copy itself is tested in test_fit_on_cuda.py)."""

    def __init__(self, loss) -> None:
        self._event, self._loss = None, loss

    @property
    def ready(self) -> bool:
        return False

    def value(self) -> float:
        return float(self._loss)


@contextlib.contextmanager
def late_readings():
    """fit reads every loss late (:class:`LateReading`) inside."""
    original, train_module._LossReading = train_module._LossReading, LateReading
    try:
        yield
    finally:
        train_module._LossReading = original


def late_fit(losses, *, on_step_ranks=(), fail_at=None, checkpoint=None, checkpoint_every=0):
    """fit over ``losses`` (one per step, the same on every rank, each step an all-reduce when
    distributed: a mesh of sample groups) with every loss read late; ``on_step`` on ``on_step_ranks``;
    step ``fail_at`` raises."""
    mesh = pyro_sp.SPMesh(sample=tdist.get_world_size() if tdist.is_initialized() else 1)
    calls, seen = [], []

    def step(i):
        calls.append(int(i))
        if fail_at is not None and len(calls) == fail_at:
            raise ValueError(f"step {fail_at} failed")
        loss = torch.tensor(losses[len(calls) - 1])
        if mesh.is_distributed:  # a collective in every step: a rank that goes on alone would wait here
            tdist.all_reduce(loss, op=tdist.ReduceOp.MAX)
        return loss

    with late_readings():
        result = fit(step, ShardedBatchSampler(len(losses), 1, mesh=mesh, shuffle=False), lambda idx: (idx[0],),
                     epochs=1, mesh=mesh, progress=False, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                     on_step=seen.append if mesh.rank in on_step_ranks else None)
    return result, calls, seen


def test_late_reading_reports_every_step(tmp_path):
    log = tmp_path / "metrics.jsonl"
    mesh = pyro_sp.SPMesh()
    with late_readings():
        result = fit(lambda i: torch.tensor(float(i) + 0.5), ShardedBatchSampler(6, 1, mesh=mesh, shuffle=False),
                     lambda idx: (idx[0],), epochs=2, mesh=mesh, progress=False, log=MetricsLog(str(log), mesh=mesh))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["step"], r["epoch"], r["loss"]) for r in records] == [
        (n + 1, n // 6, (n % 6) + 0.5) for n in range(12)]  # each step's own loss and epoch, across epochs
    assert result["step"] == 12 and result["loss"] == 5.5


def test_late_reading_nan_before_a_failing_step_is_the_error():
    with pytest.raises(FloatingPointError, match=r"The loss is nan at step 3 \(epoch 0\)") as info:
        late_fit([1.0, 2.0, float("nan"), 4.0, 5.0], fail_at=4)
    assert isinstance(info.value.__context__, ValueError)  # step 4's own error, chained
    with pytest.raises(ValueError, match="step 4 failed"):  # a finite loss before it: the step's error
        late_fit([1.0, 2.0, 3.0, 4.0, 5.0], fail_at=4)


def test_late_reading_checks_a_checkpointed_step_first(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    with pytest.raises(FloatingPointError, match="at step 4"):
        late_fit([1.0, 2.0, 3.0, float("nan"), 5.0, 6.0], checkpoint=path, checkpoint_every=2)
    with torch.random.fork_rng(devices=[]):  # loading restores the random state
        assert load_checkpoint(path, mesh=pyro_sp.SPMesh())["step"] == 2  # step 4 raised before its own
    result, calls, seen = late_fit([1.0, 2.0, 3.0], on_step_ranks=(0,))
    assert seen == [1, 2, 3] and calls == [0, 1, 2] and result["loss"] == 3.0


def test_late_reading_on_step_sees_a_checked_step():
    seen = []
    mesh = pyro_sp.SPMesh()
    losses = [1.0, float("nan"), 3.0]
    with late_readings(), pytest.raises(FloatingPointError, match="at step 2"):
        fit(lambda i: torch.tensor(losses[int(i)]), ShardedBatchSampler(3, 1, mesh=mesh, shuffle=False),
            lambda idx: (idx[0],), epochs=1, mesh=mesh, progress=False, on_step=seen.append)
    assert seen == [1]  # on_step is not called for a step whose loss is not finite


def nan_with_on_step_on_rank_0():
    late_fit([1.0, float("nan"), 3.0, 4.0], on_step_ranks=(0,))


def test_on_step_on_one_rank_reads_every_loss_at_once_on_all(pools):
    # rank 0 reads step 2's loss at once; rank 1 must too, not go on into step 3's all-reduce alone
    errors = pools(2).run_expecting_errors(nan_with_on_step_on_rank_0)
    for kind, msg, trace in errors.values():
        assert kind == "FloatingPointError" and "at step 2 (epoch 0)" in msg, msg
        assert "During handling" not in trace, trace  # found at step 2, not after step 3's all-reduce failed


# ---- elastic restart ----------------------------------------------------------------------
ELASTIC_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import pyro, pyro.distributions as dist, torch
    from pyro.infer import SVI
    from pyro.infer.autoguide import AutoNormal
    import pyro_sp
    from pyro_sp.data import ShardedBatchSampler
    from pyro_sp.train import fit

    out, kill_at = sys.argv[1], int(sys.argv[2])
    mesh = pyro_sp.init_mesh()
    torch.set_num_threads(1)
    x = torch.linspace(-1, 1, 40).unsqueeze(-1) * torch.tensor([1.0, -0.5, 2.0])
    y = (x * torch.tensor([0.5, 1.0, -1.0])).sum(-1)

    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("data", 40, subsample=torch.arange(x.shape[0])):
            pyro.sample("y", dist.Normal((x * w).sum(-1), 0.5), obs=y)

    pyro.set_rng_seed(0)
    elbo = pyro_sp.DistributedTrace_ELBO(vectorize_particles=True, num_particles=6, mesh=mesh)
    svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.05}), loss=elbo)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    def crash(step):
        if kill_at and first_attempt and mesh.rank == 1 and step == kill_at:
            os._exit(17)  # a rank dies without a word

    result = fit(svi, ShardedBatchSampler(40, 8, mesh=mesh), lambda i: (x[i], y[i]), epochs=8, mesh=mesh,
                 elbo=elbo, checkpoint=os.path.join(out, "ckpt.pt"), checkpoint_every=5, progress=False, on_step=crash)
    if mesh.rank == 0:
        loc = pyro.param("AutoNormal.locs.w").detach().tolist()
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"loss": result["loss"], "loc": loc, "resumed_from": result["resumed_from"]}, f)
    torch.distributed.destroy_process_group()
    """
)


def _torchrun(tmp_path, name: str, kill_at: int) -> dict:
    folder = tmp_path / name
    folder.mkdir()
    script = tmp_path / "elastic.py"
    script.write_text(ELASTIC_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--max-restarts=1", "--monitor-interval=0.5", str(script), str(folder), str(kill_at)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO)
    (tmp_path / f"{name}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((folder / "result.json").read_text())


def test_elastic_restart_finishes_and_matches(tmp_path):
    killed = _torchrun(tmp_path, "killed", kill_at=17)
    straight = _torchrun(tmp_path, "straight", kill_at=0)
    assert killed["resumed_from"] == 15 and straight["resumed_from"] is None
    # the resumed run continues exactly; MC tolerance would allow far more
    assert killed["loc"] == pytest.approx(straight["loc"], abs=1e-6)
    assert killed["loss"] == pytest.approx(straight["loss"], rel=1e-6)


# ---- the command ------------------------------------------------------------------------
def test_demo_smoke(tmp_path):
    cmd = [sys.executable, "-m", "pyro_sp.cli", "demo", "--nproc", "2", "--epochs", "1", "--particles", "4",
           "--predictive-samples", "4", "--out", str(tmp_path / "demo")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy" in proc.stdout and "ECE" in proc.stdout
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["steps"] == 12  # 1 epoch of the 1497 training digits in batches of 128
    assert f"test accuracy {report['accuracy']:.3f}  NLL {report['nll']:.3f}  ECE {report['ece']:.3f}" in proc.stdout
    metrics = [json.loads(line) for line in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13)) and metrics[-1]["loss"] == report["final_loss"]
    for name in ("reliability.png", "uncertainty.png"):
        assert (tmp_path / "demo" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "demo" / "checkpoint.pt").read_bytes().startswith(b"pyro_sp checkpoint v2 sha256=")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["demo", "--sample", "3", "--nproc", "4"], "--sample 3 must divide --nproc 4"),
        (["demo", "--data", "3", "--nproc", "4"], "--data 3 must divide --nproc 4"),
        (["demo", "--sample", "2", "--data", "3", "--nproc", "4"], "--sample 2 times --data 3 must equal --nproc 4"),
        (["demo", "--particles", "1", "--nproc", "2"], "--particles 1 must be at least --sample 2"),
        (["demo", "--nproc", "0"], "--nproc must be at least 1"),
        (["demo", "--epochs", "0"], "--epochs must be at least 1"),
    ],
)
def test_cli_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_info(capsys):
    assert cli_main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"pyro_sp {pyro_sp.__version__}" in out and "gloo" in out


def test_demo_checks_its_dependencies_before_launching(capsys, monkeypatch):
    """Without matplotlib the demo stops at once with the extra that has everything it needs."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        cli_main(["demo", "--nproc", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "needs matplotlib" in err and "pip install 'pyro-sp[demo]'" in err


def _extras() -> dict[str, set[str]]:
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    raw = cfg["options.extras_require"]
    return {k: {line.strip() for line in v.splitlines() if line.strip()} for k, v in raw.items()}


@pytest.mark.parametrize("feature,blocked,package", [
    ("digits", "sklearn", "scikit-learn"),
    ("sunspots", "statsmodels", "statsmodels"),
    ("plots", "matplotlib", "matplotlib"),
])
def test_optional_features_name_an_extra_that_has_them(monkeypatch, tmp_path, feature, blocked, package):
    """Each optional feature fails before any work, naming an extra that really contains what it needs."""
    import re
    import sys as _sys

    for name in list(_sys.modules):
        if name == blocked or name.startswith(blocked + "."):
            monkeypatch.delitem(_sys.modules, name)
    monkeypatch.setitem(_sys.modules, blocked, None)  # import raises ImportError
    calls = {
        "digits": lambda: load_digits(),
        "sunspots": lambda: load_sunspots(window=12),
        "plots": lambda: pyro_sp.uq.reliability_diagram(torch.full((4, 3), 1 / 3), torch.zeros(4, dtype=torch.long),
                                                        str(tmp_path / "r.png")),
    }
    with pytest.raises(ImportError) as e:
        calls[feature]()
    extra = re.search(r"pip install 'pyro-sp\[(\w+)\]'", str(e.value))
    assert extra, str(e.value)
    assert package in _extras()[extra.group(1)], (extra.group(1), _extras())
    assert {"scikit-learn", "matplotlib"} <= _extras()["demo"]
