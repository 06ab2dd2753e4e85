# SPDX-License-Identifier: Apache-2.0
"""The networks of the benchmarks, as plain ``torch.nn`` modules.

``mlp()``        the Bayesian MLP 3072-2048-2048-10 (CIFAR-10 images flattened), batch 256;
``ViTSmall``     a small vision transformer for CIFAR-10 shapes (3 x 32 x 32, patch 4,
                 64 tokens, width 192, 6 pre-norm blocks of 3 heads, MLP 384, GELU,
                 mean pooling), batch 128: 1.8 M parameters.

Every weight is Bayesian in the benchmarks (mean-field Normal guide, Normal
prior of scale ``1/sqrt(fan_in)`` for weights and 1 for biases and norms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: F401
from torch import nn

__all__ = ["MLP_SIZES", "MLP_BATCH", "VIT_BATCH", "ViTSmall", "mlp", "synthetic_data"]

MLP_SIZES = (3072, 2048, 2048, 10)
MLP_BATCH = 256
VIT_BATCH = 128


def mlp(sizes=MLP_SIZES) -> nn.Sequential:
    """Linear layers with ReLU between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # explicit softmax attention: the fused SDPA kernels' backward fails under vmap on CUDA
        # (torch 2.11: "LSE is not correctly aligned"); this is also what the NumPyro peer computes
        a = torch.softmax((q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5), dim=-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViTSmall(nn.Module):
    """A small ViT for 3 x 32 x 32 images (see the module docstring)."""

    def __init__(
        self, image: int = 32, patch: int = 4, dim: int = 192, depth: int = 6, heads: int = 3,
        hidden: int = 384, classes: int = 10,
    ) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


def synthetic_data(shape, classes: int, batch: int, device, dtype=torch.float32, seed: int = 0):
    """A fixed synthetic batch ``(x, y)`` for throughput measurements (not for accuracy)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn((batch,) + tuple(shape), generator=g, dtype=dtype).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    return x, y
