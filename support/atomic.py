"""Atomic file writes: a reader (another job, a resumed run, a DDP rank) sees the old file or the whole new one,
never half of one, and a write that fails part-way (full disk, killed process) leaves no file under the final name."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | Path, content: str | bytes | Callable[[BinaryIO], object], durable: bool = False) -> None:
    """Write `content` (text, bytes, or a function that writes into a binary file) to `path` through a temporary
    file in the same directory, then rename it into place. `durable` also fsyncs it first, so the file is on disk
    before anything written after it (a marker, say), even if the node crashes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:  # open() honours the umask, as a plain write would
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
