"""Who writes a run directory, and how: one run at a time (`one_writer`, a kernel lock on RUN_DIR/.writer.lock),
and checkpoints written whole or not at all (`AtomicCheckpointIO`).

    RUN_DIR/.writer.lock           held by the run writing here (released by the kernel if that process dies)
    RUN_DIR/.writer                who holds it: pid, host, Slurm job
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from lightning_fabric.plugins import CheckpointIO
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from support.atomic import write_atomic
from support.errors import SettingError, warn

LOCK_FILE = ".writer.lock"
OWNER_FILE = ".writer"  # who holds the lock (the lock file itself is truncated by every process that tries it)


def with_atomic_checkpoints(plugins: Any) -> list[Any]:
    """The Trainer's plugins, with AtomicCheckpointIO unless a CheckpointIO of the user's is among them."""
    given = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins] if plugins is not None else []
    return given if any(isinstance(p, CheckpointIO) for p in given) else [*given, AtomicCheckpointIO()]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic for local files: written under a temporary name, synced, then
    renamed. Lightning's own writes in place: on a full disk it left a truncated last.ckpt (measured: 409,600 bytes
    on a 400 kB tmpfs) that no resume could load, and a grid row failed at every rerun until someone deleted it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path) or storage_options is not None:  # remote storage: fsspec's transaction applies
            return super().save_checkpoint(checkpoint, path, storage_options)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            write_atomic(path, lambda f: torch.save(checkpoint, f), durable=True)
        except RuntimeError as err:
            # A disk that fills while torch writes the archive: closing it then raises "unexpected pos ..." over the
            # OSError (ENOSPC) that says what happened; that one is the error (train.py names the fix).
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise


# ---- one writer ------------------------------------------------------------------------------------------------------
@contextmanager
def one_writer(run_dir: Path, untrained: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """Holds RUN_DIR/.writer.lock while the run writes there: a second run started on the same directory stops with
    one line naming the first. The lock is the kernel's (flock; on NFS a byte-range lock), so a run that dies, even by
    kill -9 or with its node, leaves nothing stuck. A run that made the directory and ends having written nothing, or
    fails while `untrained()` and without a checkpoint (a bad setting found in setup, data that could not be had),
    takes the directories it made away again: no half-made run, lock or wandb run is left looking like one.
    Filesystems without locks: a warning, and no check."""
    made = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]  # deepest first
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK_FILE), blocking=False)
    owner = run_dir / OWNER_FILE
    try:
        lock.acquire()
    except Timeout:
        holder = owner.read_text().strip() if owner.is_file() else "another process"
        raise SettingError(f"--run_dir {run_dir} is in use by a run that is still going ({holder}): wait for it, "
                           "stop it, or give another --run_dir") from None
    except OSError as err:
        if err.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
            raise
        warn(f"{run_dir}'s filesystem has no file locks: a second run on this directory would not be stopped")
        yield
        return
    failed = False
    try:
        write_atomic(owner, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                            f"{', Slurm job ' + os.environ['SLURM_JOB_ID'] if 'SLURM_JOB_ID' in os.environ else ''}\n")
        yield
    except BaseException:
        failed = True
        raise
    finally:
        owner.unlink(missing_ok=True)
        lock.release()
        nothing = [path.name for path in run_dir.iterdir()] == [LOCK_FILE]
        if made and (nothing or (failed and untrained() and not any(run_dir.rglob("*.ckpt")))):
            shutil.rmtree(run_dir, ignore_errors=True)
            for folder in made[1:]:
                try:
                    folder.rmdir()
                except OSError:  # another run wrote there meanwhile
                    break
