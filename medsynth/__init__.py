"""medsynth: synthetic 3D medical images from a 3D DCGAN trained on real scans.

Importing the package is deliberately cheap (no torch, nibabel or SimpleITK); each command imports
what it needs when it runs.
"""

__version__ = "0.1.0"
