# SPDX-License-Identifier: Apache-2.0
"""Every random stream of pyro_sp, and the streams of a distributed call keyed by the user's global RNG.

Pyro's distributions draw from the global torch generators, and Pyro's
promise is that ``pyro.set_rng_seed(s)`` before a call reproduces it, that
successive calls draw fresh noise and that a new estimator does not replay an
old one's. pyro_sp keeps that promise at every world size:

- each distributed call draws one 62-bit **key** from the global CPU
  generator (:func:`draw_key`);
- global rank 0 draws its particles from the global generators exactly as
  Pyro's estimator would (from the state at entry, so a call on one particle
  reproduces Pyro's noise and Pyro's lazy initialisation);
- from the key, :func:`derive_seed` makes the seeds of the other streams:
  particle noise of every other rank (independent across ranks), subsample
  indices per data group (identical within a sample group);
- on exit, :func:`reseed_global` reseeds the global generators from the key
  on every rank, whatever each rank computed: ranks that were in agreement
  stay in agreement, and the next call's noise on rank 0 cannot overlap this
  call's (a fixed offset from the entry state would replay it shifted);
- an :class:`RNGStream` installs such a seed as the global state inside
  ``with stream:`` and puts the caller's state back on exit.

:func:`get_global_state` / :func:`set_global_state` snapshot and restore the
global generators (CPU and the current CUDA device once CUDA is in use).
"""

from __future__ import annotations

import hashlib

import torch

__all__ = [
    "STREAMS",
    "RNGStream",
    "derive_seed",
    "stream_seed",
    "draw_key",
    "get_global_state",
    "reseed_global",
    "set_global_state",
    "active_stream",
]

#: The :class:`RNGStream` objects whose ``with`` blocks are open, innermost last.
_ACTIVE: list = []


def active_stream() -> "RNGStream | None":
    """The innermost :class:`RNGStream` installed now (``None``: the user's global generators)."""
    return _ACTIVE[-1] if _ACTIVE else None


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed derived deterministically from ``seed`` and ``keys``."""
    digest = hashlib.blake2b(repr((int(seed),) + keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


#: Every random stream of pyro_sp: its name, and the root and coordinates of its
#: seed, ``stream_seed(root, name, *coordinates)``. One table, so no two streams
#: can share a seed by accident, and a reader finds each stream's key here.
STREAMS = {
    "particles": "call key, global rank: particle noise of a distributed ELBO call on ranks other than 0",
    "subsample": "call key, data index: subsample indices, shared by a sample group",
    "global": "call key: where a distributed call leaves every rank's global generators",
    "predictive": "call key (or the shared seed), global rank: DistributedPredictive's samples",
    "mean_field_particles": "shared seed, 'step' or 'eval', global rank, count: MeanFieldVI's noise "
    "(training steps counted apart from loss() and predict())",
    "augment": "seed, data index, sample index (or 'shared'): an Augmenter's transformations",
    "epoch": "seed, epoch: ShardedBatchSampler's permutation of the data set",
}


def stream_seed(root: int, stream: str, *coordinates) -> int:
    """
    The seed of random stream ``stream`` (a key of :data:`STREAMS`) at
    ``coordinates``, derived from ``root``.

    :raises ValueError: for a stream that :data:`STREAMS` does not define.
    """
    if stream not in STREAMS:
        raise ValueError(f"Expected a stream in {sorted(STREAMS)}, got {stream!r}; define it in STREAMS first.")
    return derive_seed(root, stream, *coordinates)


#: Keys are drawn below 2**62 (exactly representable in int64 on every backend).
KEY_BITS = 62


def draw_key() -> int:
    """One key drawn from the global CPU generator (advances it by one draw)."""
    return int(torch.randint(0, 1 << KEY_BITS, (), dtype=torch.int64).item())


def reseed_global(key: int) -> None:
    """
    Reseed the global generators (CPU and, once CUDA is in use, the current
    device) from ``derive_seed(key, "global")``: where every distributed call
    leaves the user's RNG.
    """
    seed = stream_seed(key, "global")
    torch.default_generator.manual_seed(seed)
    device = _cuda_device()
    if device is not None:
        torch.cuda.default_generators[device].manual_seed(seed)


def _cuda_device() -> int | None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    return None


def get_global_state() -> tuple:
    """A snapshot of the global generators: the CPU's and, once CUDA is in use, the current device's."""
    device = _cuda_device()
    return torch.get_rng_state(), device, None if device is None else torch.cuda.get_rng_state(device)


def set_global_state(state: tuple) -> None:
    """Restore a snapshot from :func:`get_global_state`."""
    cpu, device, cuda = state
    torch.set_rng_state(cpu)
    if device is not None:
        torch.cuda.set_rng_state(cuda, device)


class RNGStream:
    """
    A private random stream installed as the global torch RNG inside a
    ``with`` block.

    :param int seed: seed of the stream on every device.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._cpu_state = torch.Generator().manual_seed(self.seed).get_state()
        self._cuda_states: dict[int, torch.Tensor] = {}
        self._saved: list = []

    def get_state(self) -> tuple:
        """A snapshot of the stream (outside a ``with`` block)."""
        return self._cpu_state.clone(), {d: s.clone() for d, s in self._cuda_states.items()}

    def set_state(self, state: tuple) -> None:
        """Rewind the stream to a snapshot from :meth:`get_state`."""
        cpu, cuda = state
        self._cpu_state = cpu.clone()
        self._cuda_states = {d: s.clone() for d, s in cuda.items()}

    def __enter__(self) -> "RNGStream":
        device = _cuda_device()
        saved_cuda = None
        if device is not None:
            saved_cuda = torch.cuda.get_rng_state(device)
            state = self._cuda_states.get(device)
            if state is None:
                state = torch.Generator(device=f"cuda:{device}").manual_seed(self.seed).get_state()
            torch.cuda.set_rng_state(state, device)
        self._saved.append((torch.get_rng_state(), device, saved_cuda))
        torch.set_rng_state(self._cpu_state)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.pop()
        cpu, device, cuda = self._saved.pop()
        self._cpu_state = torch.get_rng_state()
        torch.set_rng_state(cpu)
        if device is not None:
            self._cuda_states[device] = torch.cuda.get_rng_state(device)
            torch.cuda.set_rng_state(cuda, device)
