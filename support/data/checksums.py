"""Checksums of data files, as datamodule.py declares them ("sha256:<hex>"; any hashlib algorithm name works): used
to verify downloads (support/data/downloads.py) and node-local copies (support/data/local_copy.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_checksum(path: Path, like: str) -> str:
    """path's checksum with the algorithm of `like` ("sha256:..."), read in blocks: archives run to hundreds of MB
    (170 MB for the largest the template ships)."""
    algorithm = like.partition(":")[0]
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return f"{algorithm}:{digest.hexdigest()}"
