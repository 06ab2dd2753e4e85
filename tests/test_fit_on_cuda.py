# SPDX-License-Identifier: Apache-2.0
"""``fit`` with a step that returns its loss as a CUDA tensor (skipped without a CUDA device): each
loss is read one step late, while the device runs the next step, and the log, the NaN stop,
checkpoints and ``on_step`` are those of reading every loss at once. Each step queues a sleep
on the device, so that reading too early or waiting for too much shows."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pyro_sp.checkpoint import load_checkpoint
from pyro_sp.data import ShardedBatchSampler
from pyro_sp.distributed.mesh import default_mesh
from pyro_sp.nn import BayesianModule, MeanFieldVI
from pyro_sp.train import MetricsLog, _LossReading, fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="reads a CUDA loss")

STEPS = 12  # one epoch: 96 items in batches of 8
SLEEP = 100_000_000  # device clock cycles a step sleeps before its work (about 50 ms)


def _run(tmp_path, name, *, nan_at=None, checkpoint_every=0, on_step=None, busy=None):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).cuda()
    vi = MeanFieldVI(BayesianModule(net), num_particles=4, num_data=96, seed=1)
    opt = torch.optim.Adam(vi.parameters(), lr=1e-2)
    x = torch.randn(96, 6, generator=torch.Generator().manual_seed(2)).cuda()
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    if nan_at is not None:
        x[(nan_at - 1) * 8] = float("nan")  # the first item of step nan_at (no shuffling)
    mesh = default_mesh()
    log = MetricsLog(str(tmp_path / f"{name}.jsonl"), mesh=mesh)
    checkpoint = str(tmp_path / f"{name}.pt") if checkpoint_every else None

    ends = []  # an event after each step's work

    def step(a, b):
        if busy is not None and ends:  # does the device still run the step before, as this one is queued?
            busy.append(not ends[-1].query())
        torch.cuda._sleep(SLEEP)
        loss = vi.step(opt, a, b)
        ends.append(torch.cuda.Event())
        ends[-1].record()
        return loss

    def batch(idx):  # without a synchronisation: pinned indices, copied behind the queued work
        idx = idx.pin_memory().to("cuda", non_blocking=True)
        return x[idx], y[idx]

    result = fit(step, ShardedBatchSampler(96, 8, mesh=mesh, shuffle=False), batch, epochs=1, mesh=mesh,
                 log=log, progress=False, objects={"vi": vi, "optimizer": opt}, checkpoint=checkpoint,
                 checkpoint_every=checkpoint_every, on_step=on_step)
    return vi, result


def _records(tmp_path, name):
    with open(tmp_path / f"{name}.jsonl") as f:
        return [json.loads(line) for line in f]


def test_late_reads_log_what_each_step_returned(tmp_path):
    busy = []
    vi, result = _run(tmp_path, "late", busy=busy)
    returned, idle = [], []
    _run(tmp_path, "at_once", on_step=returned.append, busy=idle)  # with on_step, every loss is read at once
    late, at_once = _records(tmp_path, "late"), _records(tmp_path, "at_once")
    assert [r["step"] for r in late] == list(range(1, STEPS + 1)) == returned
    assert [r["loss"] for r in late] == [r["loss"] for r in at_once]  # bit for bit, same steps
    assert result["loss"] == late[-1]["loss"] and result["step"] == vi._steps == STEPS
    # from step 3 on, each step was queued while the one before still ran: nothing waited for it (the
    # first step's host work, the first kernels' loading and the libraries' set-up, may outlast its sleep)
    assert len(busy) == STEPS - 1 and all(busy[1:])
    assert not any(idle)  # read at once, the device has finished each step before the next is queued


def test_nan_names_its_step_after_the_next_one_ran(tmp_path):
    runs = []
    with pytest.raises(FloatingPointError, match=r"The loss is nan at step 5 \(epoch 0\)"):
        _run(tmp_path, "nan", nan_at=5, busy=runs)
    assert len(runs) == 5 and all(runs[1:])  # step 6 was queued while step 5 ran, before its loss was read
    assert [r["step"] for r in _records(tmp_path, "nan")] == [1, 2, 3, 4]


def test_a_checkpoint_holds_a_checked_step(tmp_path):
    with pytest.raises(FloatingPointError, match=r"at step 6 \(epoch 0\)"):
        _run(tmp_path, "ckpt", nan_at=6, checkpoint_every=3)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):  # loading restores the random state
        written = load_checkpoint(str(tmp_path / "ckpt.pt"), mesh=default_mesh())
    assert written["step"] == 3  # step 6 raised before its own checkpoint
    assert [r["step"] for r in _records(tmp_path, "ckpt")] == [1, 2, 3, 4, 5]


def test_on_step_sees_nothing_queued_after_its_step(tmp_path):
    seen = []

    def on_step(n):  # step n's loss read, step n + 1 not queued: the stream has nothing left to run
        seen.append((n, torch.cuda.current_stream().query()))

    _run(tmp_path, "on_step", on_step=on_step)
    assert seen == [(n, True) for n in range(1, STEPS + 1)]


def test_reading_a_cuda_loss_waits_for_its_step_only():
    loss = torch.full((), 2.5, device="cuda")
    reading = _LossReading(loss)
    assert not reading.ready
    torch.cuda._sleep(10 * SLEEP)  # queued after the copy: the reading does not wait for it
    loss.fill_(7.0)  # and this is not what it holds
    assert reading.value() == 2.5
    assert not torch.cuda.current_stream().query()  # the sleep still runs
    torch.cuda.synchronize()
    cpu = _LossReading(torch.tensor(1.5))
    assert cpu.ready and cpu.value() == 1.5
