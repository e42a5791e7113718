"""All file input and output: the only code that touches nibabel, SimpleITK and pydicom.

Import from here, not from the submodules: `discover_sources(folder)` finds what is usable,
`read_volume(source)` reads one source into a `Volume`, `write_nifti(volume, path)` writes one and
`write_dicom_series` writes one as a DICOM series; `cast_for_storage` rounds and clips values into
the dtype a file stores; `file_sha256` is the content address of a file.
"""

from medsynth.io.dicom import write_dicom_series
from medsynth.io.digest import file_sha256
from medsynth.io.discover import discover_sources
from medsynth.io.nifti import write_nifti
from medsynth.io.reader import read_volume
from medsynth.io.sources import DicomLayout, Discovery, Skipped, Source
from medsynth.io.volume import SourceError, Volume, VolumeMeta, cast_for_storage, orientation_code, voxel_spacing

__all__ = [
    "DicomLayout",
    "Discovery",
    "Skipped",
    "Source",
    "SourceError",
    "Volume",
    "VolumeMeta",
    "cast_for_storage",
    "discover_sources",
    "file_sha256",
    "orientation_code",
    "read_volume",
    "voxel_spacing",
    "write_dicom_series",
    "write_nifti",
]
