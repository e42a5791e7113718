"""medsynth: synthetic 3D medical images from a 3D DCGAN trained on real scans.

Importing the package is deliberately cheap (no torch, nibabel or SimpleITK); each command imports
what it needs when it runs.
"""

import os

__version__ = "0.1.0"

# OpenMP threads that wait by spinning (libgomp's default) steal the cores of every other process:
# two medsynth processes on 2 cores ran 2.6x slower each, three 5.7x (docs/benchmarks.md). Waiting
# passively costs a single process nothing measurable. Set before torch loads OpenMP, and only if
# the user has not chosen.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
