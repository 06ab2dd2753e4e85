# SPDX-License-Identifier: Apache-2.0
"""Data for sampling-parallel training: sharded minibatches, per-rank augmentation, bundled data sets."""

from .augment import Augmenter, random_shift_and_noise
from .datasets import Split, load_digits, load_sunspots
from .sampler import ShardedBatchSampler

__all__ = ["Augmenter", "ShardedBatchSampler", "Split", "load_digits", "load_sunspots", "random_shift_and_noise"]
