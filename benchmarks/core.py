# SPDX-License-Identifier: Apache-2.0
"""Moved to :mod:`pyro_sp.bench.cpu` (``pyro-sp bench overhead|cpu-scaling|sync``); kept so the
commands recorded in BENCHMARKS.md still run."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyro_sp.bench.cpu import *  # noqa: E402,F401,F403
from pyro_sp.bench.cpu import run  # noqa: E402

if __name__ == "__main__":
    run()
