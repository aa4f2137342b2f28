"""Small filesystems of the kind a run meets: a full disk (a tmpfs of a few MB) and a read-only one (the same,
remounted read-only), for the tests that need the kernel's own ENOSPC and EROFS. Root is needed to mount: without
it the tests skip, saying why, except under CI=true, where that is a failure (as for the Slurm tests)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from slurm_fixtures import in_ci


def mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"test-{uuid.uuid4().hex[:6]}",
                             str(folder)], capture_output=True, text=True)
    if result.returncode != 0:
        reason = f"cannot mount a tmpfs ({result.stderr.strip() or result.returncode}): run as root"
        if in_ci():
            pytest.fail(f"{reason} (CI=true: the full-disk and read-only tests must run)", pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """tmpfs(name, size) mounts a tmpfs of that size at tmp_path/name and returns it; all are unmounted after."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        mount_tmpfs(tmp_path / name, size)
        mounted.append(tmp_path / name)
        return tmp_path / name

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def remount_read_only(folder: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)
