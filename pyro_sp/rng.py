# SPDX-License-Identifier: Apache-2.0
"""Named random streams that can be swapped in for the global torch RNG.

Pyro's distributions draw from the global generators. Sampling parallelism
needs two kinds of randomness on each rank: particle noise that is
independent across ranks, and subsample indices that every rank of a sample
group draws identically. An :class:`RNGStream` keeps its own generator state
(CPU, and the current CUDA device once CUDA is in use) and installs it as the
global state inside ``with stream:``; on exit it saves its advanced state and
puts the caller's state back, so the user's own RNG is left untouched.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["RNGStream", "derive_seed"]


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed derived deterministically from ``seed`` and ``keys``."""
    digest = hashlib.blake2b(repr((int(seed),) + keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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

    def _cuda_device(self) -> int | None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.current_device()
        return None

    def __enter__(self) -> "RNGStream":
        device = self._cuda_device()
        saved_cuda = None
        if device is not None:
            saved_cuda = torch.cuda.get_rng_state(device)
            state = self._cuda_states.get(device)
            if state is None:
                state = torch.Generator(device=f"cuda:{device}").manual_seed(self.seed).get_state()
            torch.cuda.set_rng_state(state, device)
        self._saved.append((torch.get_rng_state(), device, saved_cuda))
        torch.set_rng_state(self._cpu_state)
        return self

    def __exit__(self, *exc) -> None:
        cpu, device, cuda = self._saved.pop()
        self._cpu_state = torch.get_rng_state()
        torch.set_rng_state(cpu)
        if device is not None:
            self._cuda_states[device] = torch.cuda.get_rng_state(device)
            torch.cuda.set_rng_state(cuda, device)
