"""The frozen copy of the code a job runs: what `slurm_train.py` (grids, searches, agents, --local), `run_sweep.sh`
and `sbatch_agent.sh` copy once per submission, so that every array task, packed row, search worker, agent,
requeue and resume runs the code that was submitted, whatever the working tree holds by then.

    python -m support.provenance.snapshot                 # copy this tree into runs/.code/<hash>/, print the path
    python -m support.provenance.snapshot --runs-dir DIR  # into DIR/.code/<hash>/

What is copied: git's tracked files and the untracked ones it does not ignore, as they are now (uncommitted changes
included); outside git, every file but runs/, data/, checkpoints, caches and environments. The copy is
content-addressed (RUNS/.code/<sha256 of paths, modes and contents>/): identical submissions share one. It is
written under a temporary name and renamed when complete, so an interrupted copy is never used, and its files are
read-only, so a job cannot change another's code. CODE.json inside it records the commit, whether the tree was
dirty, the untracked files, and uncommitted.patch (`git diff HEAD`). Light on purpose (no torch).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from support.atomic import write_atomic
from support.errors import LaunchError

STORE = ".code"  # under the runs directory
CODE_RECORD = "CODE.json"  # inside a copy, written last: a copy without it is not one
PATCH_FILE = "uncommitted.patch"
CODE_ENV = "MLMODELDEV_CODE"  # set by job scripts: the copy a job runs (train.py records it)
MAX_MB_ENV = "MLMODELDEV_CODE_MAX_MB"
MAX_MB = 20.0  # this repository's code is ~2 MB; a tree over this holds data or checkpoints, not code
# Outside git (no .gitignore to ask), these are never code: the project's run and data directories (at its root
# only: support/data/ is code), and anywhere, logs, caches and environments.
SKIP_AT_ROOT = {"runs", "data"}
SKIP_DIRS = {".git", "wandb", "lightning_logs", "__pycache__", ".venv", "venv", ".pytest_cache", ".ruff_cache",
             ".mypy_cache", ".ipynb_checkpoints", STORE}
SKIP_SUFFIXES = (".ckpt", ".pyc")
CONFLICT = (re.compile(rb"^<<<<<<< ", re.M), re.compile(rb"^>>>>>>> ", re.M))  # git's markers, both present


@dataclass
class Snapshot:
    """A frozen copy: its directory, content hash and what it was made from."""

    dir: Path
    hash: str
    commit: str | None
    dirty: bool
    files: int
    bytes: int
    reused: bool = False

    def record(self) -> dict[str, object]:
        """What grid.json, search.json and a run's provenance say of the copy."""
        return {"dir": str(self.dir), "hash": self.hash, "commit": self.commit, "dirty": self.dirty}


def git(root: Path, *args: str) -> subprocess.CompletedProcess[bytes] | None:
    """git in `root`, or None where there is no git or no repository."""
    try:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return result if result.returncode == 0 else None


def code_files(root: Path, runs_dir: Path | None = None, ask_git: bool = True) -> list[str]:
    """The files of the code under `root`, relative, sorted: git's view where `root` is in a repository (tracked and
    untracked-not-ignored, deleted ones left out), else a walk that skips SKIP_DIRS. Never checkpoints, never what
    lies in `runs_dir` or in a store of copies."""
    listed = git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard") if ask_git else None
    if listed is not None:
        names = [name for name in listed.stdout.decode().split("\0") if name]
    else:
        names = []
        for folder, dirs, files in os.walk(root):
            skip = SKIP_DIRS | (SKIP_AT_ROOT if Path(folder) == root else set())
            dirs[:] = sorted(d for d in dirs if d not in skip and not d.endswith(".egg-info"))
            names += [str((Path(folder) / f).relative_to(root)) for f in files]
    inside = [] if runs_dir is None else [runs_dir.resolve()]
    return sorted({name for name in names if not name.endswith(SKIP_SUFFIXES) and STORE not in Path(name).parts
                   and (root / name).is_file() and not any(d in (root / name).resolve().parents for d in inside)})


def max_bytes() -> int:
    try:
        return int(float(os.environ.get(MAX_MB_ENV, MAX_MB)) * 2**20)
    except ValueError:
        raise LaunchError(f"{MAX_MB_ENV}={os.environ[MAX_MB_ENV]!r} is not a number of MB") from None


def checked_contents(root: Path, names: list[str]) -> dict[str, bytes]:
    """Every file's bytes, after the checks that refuse a tree before anything is copied or submitted."""
    if "train.py" not in names:
        raise LaunchError(f"no train.py in {root}: run from the project's root (the folder with train.py)")
    sizes = {name: (root / name).stat().st_size for name in names}
    if (total := sum(sizes.values())) > (limit := max_bytes()):
        largest = sorted(sizes.items(), key=lambda item: -item[1])[:3]
        biggest = ", ".join(f"{name} ({size / 2**20:.1f} MB)" for name, size in largest if size >= 2**20) or \
            f"{largest[0][0]} ({largest[0][1] / 2**20:.1f} MB; {len(names)} files in all)"
        raise LaunchError(f"the code to freeze for the job is {total / 2**20:.0f} MB (over {limit / 2**20:.0f} MB); "
                          f"biggest: {biggest}: move them out of the project or add them to .gitignore "
                          f"({MAX_MB_ENV}=N raises the limit)")
    contents = {}
    for name in names:
        try:
            contents[name] = (root / name).read_bytes()
        except OSError as err:
            raise LaunchError(f"cannot read {name} to freeze the code ({err.strerror}): fix its permissions, or "
                              "remove it") from None
        if all(marker.search(contents[name]) for marker in CONFLICT):
            raise LaunchError(f"{name} holds merge conflict markers (<<<<<<< ... >>>>>>>): resolve them first")
    return contents


def content_hash(contents: dict[str, bytes], root: Path) -> str:
    digest = hashlib.sha256()
    for name in sorted(contents):
        executable = os.access(root / name, os.X_OK)
        digest.update(f"{name}\0{int(executable)}\0{len(contents[name])}\0".encode())
        digest.update(contents[name])
    return digest.hexdigest()[:16]


def tree_hash(root: Path) -> str:
    """The content hash the copy of `root` would have, without copying (evaluate.py compares it with a run's)."""
    names = code_files(root)
    return content_hash({name: (root / name).read_bytes() for name in names}, root)


def git_state(root: Path) -> tuple[str | None, bool, bytes, list[str]]:
    """The commit, whether anything differs from it, the patch of tracked changes, the untracked files."""
    head = git(root, "rev-parse", "HEAD")
    if head is None:
        return None, True, b"", []
    status = git(root, "status", "--porcelain", "-z", "--untracked-files=all")
    entries = [entry for entry in (status.stdout.decode().split("\0") if status else []) if entry]
    untracked = sorted(entry[3:] for entry in entries if entry.startswith("?? "))
    patch = git(root, "diff", "HEAD", "--binary")
    return head.stdout.decode().strip(), bool(entries), patch.stdout if patch else b"", untracked


def read_record(copy: Path) -> dict[str, object] | None:
    try:
        return json.loads((copy / CODE_RECORD).read_text())
    except (OSError, ValueError):
        return None


def freeze(root: Path, runs_dir: Path, dry_run: bool = False) -> Snapshot:
    """The copy of `root`'s code under runs_dir/.code/: made now, or the identical one made before. With dry_run,
    the same checks and the copy's place, nothing written."""
    root = root.resolve()
    names = code_files(root, runs_dir)
    contents = checked_contents(root, names)
    digest = content_hash(contents, root)
    store = runs_dir.resolve() / STORE
    final = store / digest
    commit, dirty, patch, untracked = git_state(root)
    total = sum(len(data) for data in contents.values())
    if (record := read_record(final)) is not None:
        return Snapshot(final, digest, record.get("commit"), bool(record.get("dirty")), len(names), total, True)
    if dry_run:
        return Snapshot(final, digest, commit, dirty, len(names), total)
    store.mkdir(parents=True, exist_ok=True)
    partial = store / f".partial-{digest}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        for name, data in contents.items():
            path = partial / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(0o555 if os.access(root / name, os.X_OK) else 0o444)  # read-only: no job edits another's
        if patch:
            (partial / PATCH_FILE).write_bytes(patch)
        copied_untracked = [name for name in untracked if name in contents]
        record = {"hash": digest, "commit": commit, "dirty": dirty, "untracked": copied_untracked,
                  "patch": PATCH_FILE if patch else None, "source": str(root), "files": len(names), "bytes": total,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_atomic(partial / CODE_RECORD, json.dumps(record, indent=1) + "\n")
        for written in (partial / CODE_RECORD, partial / PATCH_FILE):
            if written.exists():
                written.chmod(0o444)
        try:
            partial.rename(final)
        except OSError:  # an identical submission finished its copy first: use that one
            if read_record(final) is None:
                raise
            shutil.rmtree(partial, ignore_errors=True)
            return Snapshot(final, digest, commit, dirty, len(names), total, True)
    except BaseException:
        _remove(partial)
        raise
    return Snapshot(final, digest, commit, dirty, len(names), total)


def discard(snapshot: Snapshot | None) -> None:
    """Removes a copy this submission made (not one it found) when the submission failed: nothing runs it."""
    if snapshot is not None and not snapshot.reused:
        _remove(snapshot.dir)
        with contextlib.suppress(OSError):
            snapshot.dir.parent.rmdir()  # the store, if that was its only copy


def _remove(path: Path) -> None:
    """Deletes a partial copy, read-only files included."""
    def writable_and_retry(function, name, _info) -> None:  # noqa: ANN001 (shutil's onerror signature)
        os.chmod(name, stat.S_IWUSR | stat.S_IRUSR | stat.S_IXUSR)
        function(name)

    if path.exists():
        shutil.rmtree(path, onerror=writable_and_retry)


def differing_files(copy: Path, root: Path) -> list[str]:
    """The code files that differ between a frozen copy and the tree at `root` (added, removed or changed)."""
    theirs = {name for name in code_files(copy, ask_git=False) if name not in (CODE_RECORD, PATCH_FILE)}
    ours = set(code_files(root))
    changed = [name for name in sorted(theirs & ours) if (copy / name).read_bytes() != (root / name).read_bytes()]
    return sorted(set(changed) | (theirs ^ ours))


def summary(snapshot: Snapshot) -> str:
    """One line: where the job's code is and what it is."""
    state = f"commit {snapshot.commit[:10]}{' with uncommitted changes' if snapshot.dirty else ''}" \
        if snapshot.commit else "not a git repository"
    return (f"code: {'the identical copy' if snapshot.reused else 'frozen into'} {snapshot.dir} ({snapshot.files} "
            f"files, {snapshot.bytes / 2**20:.1f} MB; {state}): every task, requeue and resume runs it")


def describe(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Freeze this project's code for a job; print the copy's path.")
    parser.add_argument("--runs-dir", default="runs", help="the copy goes into RUNS_DIR/.code/<hash>/")
    parser.add_argument("--root", default=".", help="the project (default: here)")
    args = parser.parse_args(argv)
    try:
        snapshot = freeze(Path(args.root), Path(args.runs_dir))
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(snapshot.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
