# SPDX-License-Identifier: Apache-2.0
"""Effect handlers of pyro_sp."""

from .handlers import shard_particles
from .shard_particles_messenger import PARTICLE_PLATE, ShardParticlesMessenger

__all__ = ["PARTICLE_PLATE", "ShardParticlesMessenger", "shard_particles"]
