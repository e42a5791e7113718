"""DICOM in and out: `headers` reads what medsynth needs from each file (never patient data),
`geometry` checks that a stack of images forms a regular volume and finds its affine, `series`
groups files into series and reads one into an array, and `writer` writes a volume as a series
that says it is synthetic.

Discovery uses `has_dicom_magic`, `read_header` and `sources_from_headers`; `read` reads a
discovered source; `write_dicom_series` writes one.
"""

from medsynth.io.dicom.headers import DICOM_SUFFIXES, DicomHeader, has_dicom_magic, read_header
from medsynth.io.dicom.series import read, sources_from_headers
from medsynth.io.dicom.writer import write_dicom_series

__all__ = [
    "DICOM_SUFFIXES",
    "DicomHeader",
    "has_dicom_magic",
    "read",
    "read_header",
    "sources_from_headers",
    "write_dicom_series",
]
