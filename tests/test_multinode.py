# SPDX-License-Identifier: Apache-2.0
"""Two "nodes" on this machine: two torchrun agents (``--nnodes 2``, c10d
rendezvous on localhost, 2 processes each) run the paper's HYBRID layout,
the sample axis within a node and the data axis across nodes. The result
equals the single-process estimator exactly; killing one node stops the
other with a clear error within seconds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import torch

from tests.test_exactness import _check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JOB = textwrap.dedent(
    """
    import datetime, os, sys, time
    sys.path.insert(0, os.environ["PYRO_SP_REPO"])
    import pyro, torch
    import pyro_sp
    from tests.test_exactness import exact_case

    out, case = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    mesh = pyro_sp.init_mesh(sample=2, data=2, timeout=datetime.timedelta(seconds=90))
    node = int(os.environ["GROUP_RANK"])
    layout = {"rank": mesh.rank, "node": node, "local_rank": int(os.environ["LOCAL_RANK"]),
              "sample_index": mesh.sample_index, "data_index": mesh.data_index}
    torch.set_default_dtype(torch.float64)
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    result = exact_case("trace", "normal", 5, "subsample", 2, 2)
    torch.save({"layout": layout, "result": result}, os.path.join(out, f"rank{mesh.rank}.pt"))
    if case == "train":  # then train until the other node is killed
        from pyro.infer import SVI
        from pyro.infer.autoguide import AutoNormal
        from tests.models import make_data, model
        x, y = make_data(seed=10 + mesh.data_index)
        elbo = pyro_sp.DistributedTrace_ELBO(num_particles=4, vectorize_particles=True, mesh=mesh)
        svi = SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.01}), loss=elbo)
        for step in range(100000):
            svi.step(x, y)
            if step == 5 and mesh.rank == 0:
                open(os.path.join(out, "training"), "w").close()
            time.sleep(0.01)
    torch.distributed.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agents(tmp_path, case: str) -> list[subprocess.Popen]:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    port = _free_port()
    env = dict(os.environ, PYRO_SP_REPO=REPO)
    agents = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
               f"--node-rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               "--rdzv-id=pyro_sp_two_nodes", f"--rdzv-conf=is_host={'true' if node == 0 else 'false'}",
               "--max-restarts=0", "--monitor-interval=0.5", str(script), str(tmp_path), case]
        log = open(tmp_path / f"node{node}.log", "w")  # noqa: SIM115 - closed with the agent
        agents.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                       start_new_session=True))
        log.close()
    return agents


def _log(tmp_path, node: int) -> str:
    return (tmp_path / f"node{node}.log").read_text()[-4000:]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _kill_node(agent: subprocess.Popen) -> None:
    """The node goes down: its agent and the processes it started (in sessions of their own)."""
    for pid in [agent.pid, *_children(agent.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_hybrid_over_two_nodes_equals_one_process_and_a_killed_node_stops_the_other(tmp_path):
    """One launch of two agents: the exact comparison, then training until node 1 goes down."""
    agents = _agents(tmp_path, "train")
    try:
        deadline = time.time() + 240
        while not (tmp_path / "training").exists():
            assert time.time() < deadline and all(a.poll() is None for a in agents), _log(tmp_path, 0)
            time.sleep(0.2)
        _kill_node(agents[1])
        killed = time.time()
        code = agents[0].wait(timeout=120)
        seconds = time.time() - killed
        agents[1].wait(timeout=30)
    finally:
        for agent in agents:
            if agent.poll() is None:
                _kill_node(agent)
                agent.wait(timeout=30)
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    for r, s in enumerate(saved):  # the sample axis within a node, the data axis across nodes
        layout = s["layout"]
        assert layout["rank"] == r and layout["data_index"] == layout["node"], layout
        assert layout["sample_index"] == layout["local_rank"], layout
    _check([s["result"] for s in saved])
    log = _log(tmp_path, 0)
    print(f"node 0 stopped {seconds:.1f} s after node 1 was killed")
    assert code != 0
    assert seconds < 30, f"node 0 took {seconds:.0f} s to stop (the collective timeout is 90 s)"
    assert "a peer stopped answering without reporting an error" in log, log
