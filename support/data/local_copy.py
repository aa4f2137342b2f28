"""Node-local copies of prepared datasets: a run reads data.pt from the node's own disk instead of the shared
filesystem that every array task of a grid reads at once (Lustre on Bede, $global_scratch on HEC).

A job script sets MLMODELDEV_LOCAL_DATA to the node's local scratch (clusters.toml `local_scratch`: HEC's per-job
$TMPDIR; none on a cluster without one, and `slurm_train.py --no-local-data` leaves it unset). prepare_dataset then
returns `staged(path, fingerprint)`: the copy <scratch>/mlmodeldev-data/<dataset>-<hash of its source path>/data.pt,
made once per node and dataset under a file lock (packed runs, DDP ranks and array tasks on one node share it),
verified by its SHA-256 every time a run opens it, and copied again when it is corrupt or when the source was rebuilt
since (its declaration fingerprint, size or modification time changed). The copy is left where it is: HEC deletes
$TMPDIR at the end of each job; on a disk that stays, the next job on the node finds it verified.
Where the copy cannot be made (no space, not writable), one line says so and the run reads the shared file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from filelock import FileLock

from support.atomic import write_atomic
from support.data.checksums import file_checksum

LOCAL_DATA_ENV = "MLMODELDEV_LOCAL_DATA"
COPY_RECORD = "COPIED"  # beside the copy: its source, the source's identity when copied, and the copy's SHA-256


def _copy_hashing(source: Path, dest: Path) -> str:
    """Copies source to dest (whole or not at all) and returns the SHA-256 of the bytes written."""
    digest = hashlib.sha256()

    def write(out) -> None:
        with open(source, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
                out.write(chunk)

    write_atomic(dest, write)
    return digest.hexdigest()


def copy_dir(source: Path, scratch: Path) -> Path:
    """Where the copy of `source` (a data.pt) lives on this node: one directory per dataset and source path."""
    where = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]
    return scratch / "mlmodeldev-data" / f"{source.parent.name}-{where}"


def staged(source: Path, fingerprint: str) -> Path:
    """The node-local copy of the prepared `source` when MLMODELDEV_LOCAL_DATA names a local disk, else `source`."""
    scratch = os.environ.get(LOCAL_DATA_ENV, "").strip()
    if not scratch:
        return source
    stat = source.stat()
    identity = {"source": str(source.resolve()), "fingerprint": fingerprint, "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns}
    folder = copy_dir(source, Path(scratch))
    dest, record_file = folder / source.name, folder / COPY_RECORD
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            try:
                record = json.loads(record_file.read_text())
            except (OSError, ValueError):
                record = None
            if record is not None and {k: record.get(k) for k in identity} == identity and dest.is_file():
                whole = dest.stat().st_size == record["size"]
                if whole and file_checksum(dest, "sha256:") == f"sha256:{record['sha256']}":
                    print(f"data: reading the node-local copy {dest} of {source}", flush=True)
                    return dest
                why = "is corrupt (its SHA-256 differs from the copy's)"
            elif record is not None:
                why = "is stale (the dataset was rebuilt since)" if dest.is_file() else "is missing"
            else:
                why = ""
            record_file.unlink(missing_ok=True)  # first, so a copy cut short is never taken for a whole one
            print(f"data: the node-local copy {dest} {why}: copying {source} again" if why else
                  f"data: copying {source} to the node-local {dest} (once per node)", flush=True)
            digest = _copy_hashing(source, dest)
            write_atomic(record_file, json.dumps({**identity, "sha256": digest}) + "\n")
            return dest
    except OSError as err:  # write_atomic left no part-written copy behind
        print(f"data: cannot copy {source} to {scratch} ({err.strerror or err}): reading it from the shared "
              "filesystem", flush=True)
        return source
