# SPDX-License-Identifier: Apache-2.0
"""Checkpoints cannot be silently wrong: the checksum, every load fault with
its message, failures on one rank raised on all, atomic writes and the
clean-up after a writer killed mid-write."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap

import pyro
import pytest
import torch

import pyro_sp
from pyro_sp import CheckpointError, load_checkpoint, save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: a value whose bytes are easy to find in the file
MARK = 1.2345678901234567


def _bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _put(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _write_one(path: str, step: int = 7, mesh=None) -> None:
    mesh = mesh or pyro_sp.SPMesh()
    pyro.clear_param_store()
    pyro.param("w", torch.full((64,), MARK, dtype=torch.float64))
    optim = pyro.optim.Adam({"lr": 0.1})
    save_checkpoint(path, mesh=mesh, step=step, epoch=1, optim=optim, extra={"note": "x"})


def _load_fails(path: str, fault: str) -> str:
    pyro.clear_param_store()
    before = pyro.param("w", torch.zeros(3, dtype=torch.float64)).detach().clone()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, mesh=pyro_sp.SPMesh())
    assert e.value.fault == fault and e.value.path == path
    assert torch.equal(pyro.param("w").detach(), before), "a failed load changed the state"
    message = str(e.value)
    assert repr(path) in message
    return message


def test_round_trip(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    _write_one(path)
    pyro.clear_param_store()
    info = load_checkpoint(path, mesh=pyro_sp.SPMesh())
    assert info == {"step": 7, "epoch": 1, "extra": {"note": "x"}}
    assert torch.equal(pyro.param("w").detach(), torch.full((64,), MARK, dtype=torch.float64))
    assert _bytes(path).startswith(b"pyro_sp checkpoint v2 sha256=")
    assert os.listdir(tmp_path) == ["ckpt.pt"], "a temporary file was left behind"


def test_flipped_byte_in_a_parameter_is_caught(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    _write_one(path)
    data = bytearray(_bytes(path))
    at = bytes(data).index(torch.tensor([MARK], dtype=torch.float64).numpy().tobytes())
    data[at + 3] ^= 0x40  # inside the parameter's storage: the zip structure stays intact
    _put(path, bytes(data))
    # the corruption is one torch.load would accept: without the checksum it would resume silently
    payload = bytes(data[bytes(data).index(b"\n") + 1:])
    silently = torch.load(io.BytesIO(payload), weights_only=False)["param_store"]["params"]["w"]
    assert not torch.equal(silently, torch.full((64,), MARK, dtype=torch.float64))
    message = _load_fails(path, "checksum")
    assert "SHA-256" in message and "corrupted" in message and "intact copy" in message


def test_truncated_file(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    _write_one(path)
    data = _bytes(path)
    _put(path, data[: len(data) // 2])
    message = _load_fails(path, "truncated")
    size = len(data) - data.index(b"\n") - 1
    assert f"of the {size} bytes" in message and "cut short" in message


def test_truncated_header(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    _write_one(path)
    _put(path, _bytes(path)[:30])
    assert "header is cut off" in _load_fails(path, "truncated")


def test_empty_file(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    _put(path, b"")
    assert "empty (0 bytes)" in _load_fails(path, "empty")


def test_missing_file(tmp_path):
    assert "does not exist" in _load_fails(str(tmp_path / "nothing.pt"), "missing")


def test_not_a_checkpoint(tmp_path):
    path = str(tmp_path / "plain.pt")
    torch.save({"version": 1}, path)  # what an older pyro_sp or plain torch.save writes
    assert "does not start with the pyro_sp checkpoint header" in _load_fails(path, "not a checkpoint")


def _save_on_mesh(path: str) -> None:
    mesh = pyro_sp.SPMesh(sample=2)
    pyro.param("w", torch.full((64,), MARK, dtype=torch.float64))
    save_checkpoint(path, mesh=mesh, step=3)


def test_checkpoint_of_another_mesh(pools, tmp_path):
    path = str(tmp_path / "two.pt")
    pools(2).run(_save_on_mesh, path)
    message = _load_fails(path, "mesh")
    assert "sample=2, data=1 (2 ranks)" in message and "sample=1, data=1 (1 ranks)" in message
    assert "same number of ranks" in message


def _load_per_rank(paths: list[str]) -> None:
    mesh = pyro_sp.SPMesh(sample=2)
    load_checkpoint(paths[mesh.rank], mesh=mesh)


def test_a_file_bad_on_one_rank_stops_every_rank(pools, tmp_path):
    good, bad = str(tmp_path / "good.pt"), str(tmp_path / "bad.pt")
    pools(2).run(_save_on_mesh, good)
    data = _bytes(good)
    _put(bad, data[:-10])
    errors = pools(2).run_expecting_errors(_load_per_rank, [good, bad])
    assert errors[1][0] == "CheckpointError" and "cut short" in errors[1][1] and repr(bad) in errors[1][1]
    assert errors[0][0] == "RankError"
    # rank 0 read its good file, and stops naming rank 1's error in full
    assert errors[0][1].startswith(
        f"load_checkpoint({good!r}) failed on 1 of 2 ranks (rank 1: CheckpointError: {errors[1][1]})"
    ), errors[0][1]
    assert errors[0][1].endswith("No rank resumed."), errors[0][1]


def _save_into(path: str) -> None:
    save_checkpoint(path, mesh=pyro_sp.SPMesh(sample=2), step=1)


def test_a_failed_write_stops_every_rank(pools, tmp_path):
    folder = tmp_path / "a_directory.pt"
    folder.mkdir()  # rank 0 cannot replace a directory by a file
    errors = pools(2).run_expecting_errors(_save_into, str(folder))
    assert errors[0][0] in ("IsADirectoryError", "OSError")
    assert repr(str(folder)) in errors[0][1], errors[0][1]  # the OS names the directory
    assert errors[1][0] == "RankError"
    assert errors[1][1].startswith(
        f"save_checkpoint({str(folder)!r}) failed on 1 of 2 ranks (rank 0: {errors[0][0]}: {errors[0][1]})"
    ), errors[1][1]
    assert errors[1][1].endswith("No checkpoint was written at this step."), errors[1][1]
    assert folder.is_dir() and not list(folder.iterdir()), "the directory was written into"


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import pyro, torch
    import pyro_sp

    path = sys.argv[1]
    mesh = pyro_sp.SPMesh()
    pyro.param("w", torch.ones(1000, dtype=torch.float64))
    pyro_sp.save_checkpoint(path, mesh=mesh, step=1)
    pyro.get_param_store()["w"] = torch.full((1000,), 2.0, dtype=torch.float64)
    # die when the new file is written but not yet synced and renamed
    os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
    pyro_sp.save_checkpoint(path, mesh=mesh, step=2)
    """
)


def test_kill_during_the_write(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    proc = subprocess.run([sys.executable, str(script), path], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    stale = sorted(n for n in os.listdir(tmp_path) if n.startswith("ckpt.pt.tmp."))
    assert len(stale) == 1, os.listdir(tmp_path)
    # the previous checkpoint is intact
    pyro.clear_param_store()
    assert load_checkpoint(path, mesh=pyro_sp.SPMesh())["step"] == 1
    assert torch.equal(pyro.param("w").detach(), torch.ones(1000, dtype=torch.float64))
    # the next save removes the stale temporary file
    _write_one(path, step=5)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "writer.py"]
    assert load_checkpoint(path, mesh=pyro_sp.SPMesh())["step"] == 5
