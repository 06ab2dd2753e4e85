# SPDX-License-Identifier: Apache-2.0
"""Batched, per-rank random augmentation of image batches on their device."""

from __future__ import annotations

import torch

from pyro_sp.distributed.fingerprint import rank_local
from pyro_sp.distributed.mesh import SPMesh, default_mesh
from pyro_sp.distributed.streams import stream_seed

__all__ = ["Augmenter", "random_shift_and_noise"]


def random_shift_and_noise(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    max_shift: int = 1,
    p_shift: float = 1.0,
    noise: float = 0.05,
) -> torch.Tensor:
    """
    Shift each image of a batch ``(B, C, H, W)``, with probability
    ``p_shift``, by up to ``max_shift`` pixels in each direction (zero
    padding), and add Gaussian pixel noise of scale ``noise``. Plain torch,
    batched; the random numbers are drawn on the CPU from ``generator`` (the
    same on any device), the images stay on theirs.
    """
    if x.dim() != 4:
        raise ValueError(f"Expected images of shape (batch, channels, height, width), got {tuple(x.shape)}.")
    b, _, h, w = x.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=generator, device="cpu")
    shifts = shifts * (torch.rand(b, 1, generator=generator, device="cpu") < p_shift)
    padded = torch.nn.functional.pad(x, (max_shift,) * 4)
    rows = (torch.arange(h, device="cpu") + max_shift).unsqueeze(0) - shifts[:, :1]  # (B, H)
    cols = (torch.arange(w, device="cpu") + max_shift).unsqueeze(0) - shifts[:, 1:]  # (B, W)
    rows, cols = rows.to(x.device), cols.to(x.device)
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    out = out.permute(0, 3, 1, 2)
    eps = torch.randn(out.shape, generator=generator, device="cpu")  # the same numbers on any device
    return out + noise * eps.to(x.device, x.dtype)


class Augmenter:
    """
    Applies a random transform ``fn(x, generator)`` with a stream of this
    rank's own: every rank of a sample group augments the *same* minibatch
    independently (the practice that cuts the epochs to convergence in
    sampling-parallel training), or identically with ``independent=False``
    (for comparison). Reproducible from ``seed``. With ``independent=True``
    the output is marked :func:`~pyro_sp.rank_local`, so the estimators'
    per-call data check compares only its shape and dtype across the sample
    group (its values differ on purpose).

    :param fn: the transform, e.g. :func:`random_shift_and_noise`.
    :param SPMesh mesh: the process grid.
    :param int seed: seed shared by all ranks.
    :param bool independent: a different stream on every sample rank.
    """

    def __init__(self, fn=random_shift_and_noise, *, mesh: SPMesh | None = None, seed: int = 0, independent: bool = True):
        self.fn = fn
        self.mesh = default_mesh() if mesh is None else mesh
        self.independent = independent
        who = self.mesh.sample_index if independent else 0
        self.generator = torch.Generator().manual_seed(
            stream_seed(seed, "augment", self.mesh.data_index, who)
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x, self.generator)
        return rank_local(out) if self.independent and self.mesh.sample > 1 else out

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
