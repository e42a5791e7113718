"""All file input and output: the only code that touches nibabel, SimpleITK and pydicom.

Import from here, not from the submodules: `discover_sources(folder)` finds what is usable,
`read_volume(source)` reads one source into a `Volume`, `write_nifti(volume, path)` writes one.
"""

from medsynth.io.discover import discover_sources
from medsynth.io.reader import read_volume
from medsynth.io.sources import DicomLayout, Discovery, Skipped, Source
from medsynth.io.volume import SourceError, Volume, orientation_code, voxel_spacing
from medsynth.io.writers import write_nifti

__all__ = [
    "DicomLayout",
    "Discovery",
    "Skipped",
    "Source",
    "SourceError",
    "Volume",
    "discover_sources",
    "orientation_code",
    "read_volume",
    "voxel_spacing",
    "write_nifti",
]
