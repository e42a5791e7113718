"""Content addresses of files: what the cache keys sources by and sidecars name checkpoints by."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path, block_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, hex, read in blocks so a multi-GB checkpoint or scan fits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()
