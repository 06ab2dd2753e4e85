# SPDX-License-Identifier: Apache-2.0
"""Test helpers: a pool of gloo ranks spawned once per session, pinned
particle noise, and comparisons."""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import socket
import traceback

import pyro
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: Seconds a test body may run on the pool before the pool is declared hung.
TASK_TIMEOUT = 120
#: Timeout of the collectives inside the pool: a hang becomes an error.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tasks, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            _reset_state()
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - sent back to the test
            results.put((rank, False, (type(e).__name__, str(e), traceback.format_exc())))
    dist.destroy_process_group()


def _reset_state() -> None:
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.settings.set(module_local_params=False)
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)


class RankFailure(Exception):
    """A test body raised on some ranks; ``errors`` maps rank to (type, message)."""

    def __init__(self, errors: dict[int, tuple[str, str, str]]) -> None:
        self.errors = errors
        text = "\n".join(f"--- rank {r}: {e[0]}: {e[1]}\n{e[2]}" for r, e in sorted(errors.items()))
        super().__init__(f"test body failed on ranks {sorted(errors)}:\n{text}")


class RankPool:
    """``world`` gloo ranks that run module-level test functions on request."""

    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")
        self.world = world
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world)]
        port = _free_port()
        self.procs = [
            ctx.Process(
                target=_worker, args=(r, world, port, self.tasks[r], self.results), daemon=True
            )
            for r in range(world)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results."""
        if not self.alive():
            raise RuntimeError("rank pool is dead")
        for q in self.tasks:
            q.put((fn, args, kwargs))
        out, errors = {}, {}
        for _ in range(self.world):
            try:
                rank, ok, value = self.results.get(timeout=TASK_TIMEOUT)
            except queue.Empty:
                self.close(force=True)
                raise TimeoutError(f"{fn.__name__} did not finish on all {self.world} ranks")
            (out if ok else errors)[rank] = value
        if errors:
            raise RankFailure(errors)
        return [out[r] for r in range(self.world)]

    def run_expecting_errors(self, fn, *args, **kwargs) -> dict[int, tuple[str, str, str]]:
        """Run ``fn`` and return the error of every rank; fail if some rank did not raise."""
        try:
            self.run(fn, *args, **kwargs)
        except RankFailure as e:
            missing = set(range(self.world)) - set(e.errors)
            assert not missing, f"ranks {sorted(missing)} did not raise: {e}"
            return e.errors
        raise AssertionError(f"{fn.__name__} raised on no rank")

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self, force: bool = False) -> None:
        if not force and self.alive():
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.kill()


# ---- pinned particle noise ---------------------------------------------------------
_NOISE_MODULES = (
    "torch.distributions.normal",
    "torch.distributions.multivariate_normal",
    "torch.distributions.lowrank_multivariate_normal",
)


@contextlib.contextmanager
def pinned_noise(num_particles: int, lo: int, hi: int, dim: int = 0):
    """
    Pin the particle noise of reparameterized Normal, MultivariateNormal and
    LowRankMultivariateNormal samples and of Bernoulli samples: each draw
    whose dimension ``dim`` is the particle dimension draws the values of all
    ``num_particles`` particles from the global RNG and keeps ``[lo, hi)``.
    Started from the same RNG state, the single-process reference
    (``lo, hi = 0, N``) and every rank (its own share) see slices of the same
    values. The slice is an ordinary tensor op, so this also holds inside
    JIT-compiled estimators.
    """
    import importlib

    def full_shape(shape):
        shape = list(shape)
        if not torch.jit.is_tracing() and (not shape or shape[dim] not in (hi - lo, num_particles)):
            raise AssertionError(
                f"pinned_noise expected a particle dimension of {hi - lo} at {dim}, got {shape}"
            )
        # a pass that is blocked from pyro_sp's handlers (JIT's parameter capture) sees all N
        local = shape[dim] != num_particles
        shape[dim] = num_particles
        return shape, local

    def take(full, local):
        return full.narrow(dim % full.dim(), lo, hi - lo) if local else full

    def fake(shape, dtype, device):
        shape, local = full_shape(shape)
        return take(torch.randn(shape, dtype=dtype, device=device), local)

    def bernoulli_sample(self, sample_shape=torch.Size()):
        shape, local = full_shape(self._extended_shape(sample_shape))
        with torch.no_grad():
            u = take(torch.rand(shape, dtype=self.probs.dtype, device=self.probs.device), local)
            return (u < self.probs.expand(u.shape)).to(self.probs.dtype)

    modules = [importlib.import_module(m) for m in _NOISE_MODULES]
    saved = [m._standard_normal for m in modules]
    saved_bernoulli = torch.distributions.Bernoulli.sample
    try:
        for m in modules:
            m._standard_normal = fake
        torch.distributions.Bernoulli.sample = bernoulli_sample
        yield
    finally:
        for m, f in zip(modules, saved):
            m._standard_normal = f
        torch.distributions.Bernoulli.sample = saved_bernoulli


@contextlib.contextmanager
def pinned_sequential_noise(elbo, first_particle: int, seed: int = 0):
    """
    Pin the noise of sequential (non-vectorized) particles: the ``j``-th
    standard-normal draw of global particle ``k`` comes from a generator seeded
    by ``(seed, k, j)``. ``elbo`` counts its particles from ``first_particle``
    (the rank's ``lo``; 0 for the reference).
    """
    import importlib

    state = {"k": first_particle - 1, "j": 0}
    original = elbo._get_trace

    def counting_get_trace(*args, **kwargs):
        state["k"] += 1
        state["j"] = 0
        return original(*args, **kwargs)

    def fake(shape, dtype, device):
        g = torch.Generator().manual_seed(seed * 1_000_003 + state["k"] * 1009 + state["j"])
        state["j"] += 1
        return torch.randn(tuple(shape), generator=g, dtype=torch.float64, device="cpu").to(dtype=dtype, device=device)

    modules = [importlib.import_module(m) for m in _NOISE_MODULES]
    saved = [m._standard_normal for m in modules]
    elbo._get_trace = counting_get_trace
    try:
        for m in modules:
            m._standard_normal = fake
        yield
    finally:
        del elbo._get_trace
        for m, f in zip(modules, saved):
            m._standard_normal = f


@contextlib.contextmanager
def particle_seed(elbo, seed: int):
    """Start the particle noise of ``elbo`` (distributed or Pyro's) from ``seed`` on every rank."""
    from pyro_sp import DistributedELBO

    if isinstance(elbo, DistributedELBO) and elbo.mesh.is_distributed:
        # every rank's particle stream starts from ``seed`` (pinned noise then slices it);
        # the subsample stream stays the data group's
        derived = type(elbo)._stream_seeds
        elbo._stream_seeds = lambda key: (seed, derived(elbo, key)[1])
        try:
            yield
        finally:
            del elbo._stream_seeds
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            yield


def assert_close(actual, expected, rtol=1e-10, atol=1e-12, msg=""):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{msg}: {m}",
    )
