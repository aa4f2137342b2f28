"""Datasets prepared once per data directory: downloaded with pySmartDL, verified, built into tensors, under a lock.

prepare_dataset(name, declaration, data_dir) makes DATA_DIR/<name>/data.pt from a declaration (anything with
`files`, the RemoteFiles to download into DATA_DIR/<name>/raw/, and `build`, raw dir -> dict of tensors); the
marker DATA_DIR/<name>/COMPLETE is written last and holds a fingerprint of the declaration (files, checksums, the
build function's source): a declaration edited since then is rebuilt, not served stale. A file declared at a
local path (`file:///data/x.csv` or `/data/x.csv`) is copied, not downloaded, and DATA_DIR/<name>/SOURCES records
its stat: a file edited since is noticed and the dataset prepared again (its checksum then decides). Many processes
(DDP ranks, array tasks, separate jobs) may call it at once: one does the work under a file lock, the others wait
and then reuse it. A call that finds the marker loads nothing and touches no network. In a job whose cluster has
node-local scratch, the path returned is a verified copy there (support/data/local_copy.py). Every failure is one
DownloadError line that names the file, the URLs tried (or the local file) and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from filelock import FileLock, Timeout
from pySmartDL import SmartDL

from support.atomic import write_atomic
from support.data.checksums import file_checksum
from support.data.local_copy import staged

COMPLETE_MARKER = "COMPLETE"  # written last: a dataset directory without it is never trusted
PROCESSED_FILE = "data.pt"
SOURCES_FILE = "SOURCES"  # beside the marker: the local files a dataset was prepared from, with their stat
MIRROR_ENV = "DATA_MIRROR"  # a cluster's own mirror, used instead of the declared: http://host/data/{dataset}/
TIMEOUT_S = 20.0  # a connection or read that waits longer fails (pySmartDL applies it per socket operation)
MIN_SPEED = 50_000  # bytes/s: a transfer slower than this on average is abandoned, so a trickle cannot hang us
ATTEMPTS = 3  # per URL, when the server answered but the transfer failed (dropped, stalled, truncated, HTTP 5xx)
BACKOFF_S = 2.0  # wait 2 s, then 4 s, ... between attempts at one URL
THREADS = 4  # parallel connections per file where the server allows ranges (pySmartDL keeps parts >= 2 MB)


class DownloadError(RuntimeError):
    """A dataset could not be downloaded or prepared. The message is one line: file, URLs tried, what to do."""


@dataclass(frozen=True)
class RemoteFile:
    """One downloaded file: its name in DIR/<dataset>/raw/, its checksum, and the URLs that serve it, in order."""

    name: str
    checksum: str  # "<hashlib algorithm>:<hex digest>", e.g. "sha256:9f86d0..." or "md5:f68b3c..."
    urls: tuple[str, ...]

    def __post_init__(self) -> None:
        algorithm, _, digest = self.checksum.partition(":")
        if algorithm not in hashlib.algorithms_available or not digest:
            raise ValueError(f"{self.name}: checksum must look like 'sha256:<hex>', got {self.checksum!r}")
        # A relative path would be read from wherever a job starts (a Slurm job runs in runs/.code/<hash>/)
        if relative := [url for url in self.urls if not urllib.parse.urlsplit(url).scheme and
                        not Path(url).expanduser().is_absolute()]:
            raise ValueError(f"{self.name}: {relative[0]!r} is neither a URL (https://..., file:///...) nor an "
                             "absolute path: give the file's full path, as /data/... or file:///data/...")


def local_path(url: str) -> Path | None:
    """The file that a file:// URL (of this host) or a plain path names, made absolute; None for any other URL.
    Symbolic links are kept as named: a link pointed at another version of the file is an edit."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file" and parts.netloc in ("", "localhost"):
        return Path(urllib.request.url2pathname(parts.path)).absolute()
    return Path(url).expanduser().absolute() if not parts.scheme else None


def urls_for(file: RemoteFile, dataset: str, base: str | None) -> list[str]:
    """Where `file` comes from: `base` (a mirror, {dataset} replaced) + its name if given, else its declared URLs."""
    return [base.replace("{dataset}", dataset).rstrip("/") + "/" + file.name] if base else list(file.urls)


def source_identity(path: Path) -> dict[str, object]:
    """What SOURCES records of a local file: enough to notice an edit without reading it. The change time too: no
    one can set it, so a copy that keeps the old size and modification time (`cp -p`, `rsync -t`) still shows."""
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
            "inode": stat.st_ino}


def remote_files(mirrors: list[str], checksums: dict[str, str]) -> tuple[RemoteFile, ...]:  # file f is at mirror + f
    return tuple(RemoteFile(name, checksum, tuple(m + name for m in mirrors)) for name, checksum in checksums.items())


class DatasetDeclaration(Protocol):
    """What prepare_dataset needs to know of a dataset (datamodule.py's DatasetSpec is one)."""

    @property
    def files(self) -> tuple[RemoteFile, ...]: ...  # downloaded and verified into DIR/<name>/raw before `build`

    @property
    def build(self) -> Callable[[Path], dict[str, torch.Tensor]]: ...  # DIR/<name>/raw -> tensors, saved to data.pt


def source_of(function: Callable) -> Iterator[str]:
    """The source of `function` and of every function of its own module that it calls, directly or not: what a
    researcher edits when a dataset changes (a build function and the file readers it calls, say)."""
    seen: set[Callable] = set()
    pending = [getattr(function, "func", function)]  # a functools.partial builds with its function
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        code = getattr(current, "__code__", None)
        try:
            yield inspect.getsource(current)
        except (OSError, TypeError):  # no source to read (made at run time): its bytecode says what it does
            yield repr(code.co_code) if code else repr(current)
        codes = [code] if code else []
        while codes:  # names used by the function and by its nested functions and lambdas
            inner = codes.pop()
            codes += [const for const in inner.co_consts if inspect.iscode(const)]
            for name in inner.co_names:
                called = getattr(current, "__globals__", {}).get(name)
                if inspect.isfunction(called) and called.__module__ == current.__module__:
                    pending.append(called)


def declaration_fingerprint(spec: DatasetDeclaration) -> str:
    """A digest of what builds the dataset: each file's name and checksum (not its URLs: a new mirror serves the
    same bytes) and the build function's source. Kept in the COMPLETE marker, so an edited declaration is noticed."""
    digest = hashlib.sha256()
    for file in spec.files:
        digest.update(f"{file.name}\0{file.checksum.lower()}\0".encode())
    for source in source_of(spec.build):
        digest.update(source.encode())
    return "sha256:" + digest.hexdigest()


def fetch(url: str, dest: Path) -> None:
    """One pySmartDL transfer of url to dest; raises what went wrong."""
    dl = SmartDL(url, str(dest), threads=THREADS, timeout=TIMEOUT_S, progress_bar=sys.stdout.isatty())
    # pySmartDL's own retries reuse a thread pool that remembers the first failure, so they re-download the
    # whole file three times and fail anyway: it makes one attempt, the retries with back-off are ours.
    dl.attemps_limit = 1
    dl.start(blocking=False)  # raises at once for a refused connection or an HTTP error
    # Its timeout bounds each socket operation, not the transfer: a server trickling bytes would keep it going
    # forever, so wait against a deadline of our own (unknown sizes count as 1 GiB).
    deadline = time.monotonic() + 2 * TIMEOUT_S + (dl.filesize or 1 << 30) / MIN_SPEED
    try:
        while not dl.isFinished():
            if time.monotonic() > deadline:
                raise OSError(f"too slow: under {MIN_SPEED / 1000:g} kB/s on average")
            time.sleep(0.05)
    except BaseException:  # our deadline, or Ctrl-C: stop its threads, which would otherwise carry on
        dl.stop()
        raise
    dl.wait()
    if not dl.isSuccessful():
        thread_errors = dl.pool.get_exceptions()  # the errors its threads hit (get_errors() only summarises them)
        raise thread_errors[0] if thread_errors else OSError("incomplete transfer: the connection closed early")
    size = dest.stat().st_size
    if dl.filesize and size != dl.filesize:  # pySmartDL lets up to 4 kB per thread go missing
        raise OSError(f"incomplete transfer: received {size} of {dl.filesize} bytes")


def describe(err: Exception) -> tuple[str, bool]:
    """A short reason, and whether the same URL is worth another try (the server answered, the transfer failed)."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}", int(err.code) >= 500 or int(err.code) in (408, 429)
    if isinstance(err, urllib.error.URLError):  # no connection at all: refused, unknown host, no route, timeout
        return f"cannot connect ({getattr(err.reason, 'strerror', None) or err.reason})", False
    if isinstance(err, (TimeoutError, ConnectionError)):
        stalled = isinstance(err, TimeoutError)
        return f"no data for {TIMEOUT_S:g} s (server stalled)" if stalled else f"connection dropped ({err})", True
    return str(err) or type(err).__name__, True


def download(file: RemoteFile, urls: list[str], raw: Path, dataset: str) -> dict[str, object] | None:
    """Fetch file into raw/, verified: it appears under its name whole and correct, or not at all. A URL that names a
    local file is copied. Returns the local file's source_identity (None when downloaded). A full disk is raised as
    it is (OSError ENOSPC): no other attempt or URL can help, and prepare_dataset names it."""
    failures: list[str] = []
    mismatch: tuple[str, str] | None = None  # (where, checksum found) of the last file that was not the declared one
    for url in urls:
        source = local_path(url)
        for attempt in range(1, ATTEMPTS + 1):
            tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=raw))  # also catches pySmartDL's .000 parts
            try:
                if source is not None:
                    identity = source_identity(source)  # before reading: an edit during the copy shows next time
                    print(f"copying {source}", flush=True)
                    shutil.copyfile(source, tmp / file.name)
                else:
                    identity = None
                    print(f"downloading {url}", flush=True)
                    fetch(url, tmp / file.name)
                got = file_checksum(tmp / file.name, file.checksum)
                if got == file.checksum.lower():
                    os.replace(tmp / file.name, raw / file.name)  # atomic: the final name only holds verified files
                    return identity
                problem, retry, mismatch = f"checksum mismatch (got {got}, declared {file.checksum})", False, \
                    (str(source or url), got)
            except Exception as err:  # whatever pySmartDL raises: report it, then try again or move on
                if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                    raise
                problem, retry = describe(err) if source is None else (getattr(err, "strerror", None) or str(err),
                                                                       False)  # a local file: no second try
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            if not retry or attempt == ATTEMPTS:
                failures.append(f"{source or url}: {problem}" + (f" ({attempt} attempts)" if attempt > 1 else ""))
                break
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
    if all(local_path(url) for url in urls):  # no network involved: the message is about the file
        if mismatch:
            where, got = mismatch
            raise DownloadError(f"{where} (file {file.name} of dataset {dataset!r}) is not the file declared: its "
                                f"checksum is {got}, the declaration says {file.checksum}. Changed on purpose? Put "
                                f"{got!r} in the declaration. If not, put the declared version back")
        raise DownloadError(f"cannot read {file.name} of dataset {dataset!r}: {'; '.join(failures)}. Put the file "
                            "there, or correct its path in the dataset's declaration")
    hint = "; a checksum mismatch means the server sent other bytes than declared" if mismatch else ""
    raise DownloadError(f"could not download {file.name} of dataset {dataset!r}: {'; '.join(failures)}. "
                        f"Check the network and mirror, or prepare it where there is internet (a login node): "
                        f"`python datamodule.py --dataset {dataset} --data_dir DIR`, or point --data.mirror or "
                        f"${MIRROR_ENV} at a mirror that has it{hint}")


def changed_sources(root: Path, spec: DatasetDeclaration, dataset: str, base: str | None) -> str | None:
    """Why the dataset prepared in `root` must be prepared again for its local files, or None. A file whose stat
    (size, modification and change times, inode) is the one recorded is taken as unchanged: a stat costs ~2 us, a
    SHA-256 of a 170 MB file 0.16 s from the page cache (more from a cold shared filesystem), in every process of
    every run. Only when they differ is the file read: the same bytes (touched, copied over) update the record and
    need nothing else."""
    local = [file for file in spec.files if any(local_path(url) for url in urls_for(file, dataset, base))]
    if not local:
        return None
    try:
        recorded = json.loads((root / SOURCES_FILE).read_text())
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict) or not all(entry is None or isinstance(entry, dict) and
                                                 isinstance(entry.get("path"), str) for entry in recorded.values()):
        return f"no record ({SOURCES_FILE}) of the local files it was prepared from"
    refreshed = dict(recorded)
    for file in local:
        entry = recorded.get(file.name)  # None: it came from elsewhere (a download, a copy put into raw/ by hand)
        paths = [str(where) for url in urls_for(file, dataset, base) if (where := local_path(url)) is not None]
        if entry and entry["path"] not in paths:  # URLs are not fingerprinted: a file moved keeps the fingerprint
            return f"{file.name} is declared at {paths[0]} now, not at {entry['path']}"
        try:
            now = source_identity(Path(entry["path"])) if entry else entry
        except OSError:  # gone: the prepared data holds the declared bytes, so it is still what was asked for
            continue
        if now == entry:
            continue
        if file_checksum(Path(entry["path"]), file.checksum) != file.checksum.lower():
            return f"{entry['path']} changed since it was prepared"
        refreshed[file.name] = now
    if refreshed != recorded:
        with contextlib.suppress(OSError):  # a read-only data directory: read again next time, nothing worse
            write_atomic(root / SOURCES_FILE, json.dumps(refreshed) + "\n")
    return None


def prepare_dataset(name: str, spec: DatasetDeclaration, data_dir: str | Path, mirror: str | None = None) -> Path:
    """Download, verify and build DIR/<name>/data.pt once; safe when many processes (DDP ranks, array tasks,
    separate jobs) call it at once: one does the work under a file lock, the others wait and then reuse it.
    Each file comes from its declared URLs in order, or only from `mirror` (default $DATA_MIRROR) + its name."""
    root = Path(data_dir).expanduser().resolve() / name
    marker = root / COMPLETE_MARKER
    fingerprint = declaration_fingerprint(spec)
    base = mirror or os.environ.get(MIRROR_ENV)
    if built_by(marker) == fingerprint and not changed_sources(root, spec, name, base):  # no lock, no network
        return staged(root / PROCESSED_FILE, fingerprint)  # a node-local copy where the job asked for one
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"cannot create data directory {root}: {err.strerror}; pass a writable --data.data_dir"
                            ) from err
    lock = FileLock(str(root) + ".lock")
    try:
        lock.acquire(blocking=False)
    except Timeout:
        print(f"waiting for another process to prepare {name} in {root}", flush=True)
        lock.acquire()
    step = "creating raw/"  # named in the one message for a full disk, whichever step filled it
    try:
        found = built_by(marker)  # another process may have built it while we waited
        stale = changed_sources(root, spec, name, base) if found == fingerprint else None
        if found != fingerprint or stale:
            if found is not None:  # data.pt is replaced atomically: a job that has loaded it keeps what it read
                print(f"dataset {name!r}: {stale}: preparing it again" if stale else
                      f"dataset {name!r} was declared differently when {root} was built: rebuilding it", flush=True)
            raw = root / "raw"
            if spec.files:
                raw.mkdir(exist_ok=True)
                for leftover in raw.glob(".download-*"):  # from a process that was killed mid-download
                    shutil.rmtree(leftover, ignore_errors=True)
            sources: dict[str, object] = {}  # file name -> the local file it was copied from (None: not local)
            for file in spec.files:
                path, urls = raw / file.name, urls_for(file, name, base)
                # a local file may have been edited since raw/ got its copy: read again while it is there
                local = [where for url in urls if (where := local_path(url)) is not None and where.is_file()]
                if not local and path.exists() and file_checksum(path, file.checksum) == file.checksum.lower():
                    sources[file.name] = None
                    continue  # copied in by hand, or fetched by an earlier, interrupted preparation
                step = f"downloading {file.name} from {' or '.join(urls)}"
                sources[file.name] = download(file, urls, raw, name)
            step = f"building {PROCESSED_FILE}"
            data = spec.build(raw)
            step = f"writing {PROCESSED_FILE}"
            # durable: on disk before the marker can be, even if the node crashes
            write_atomic(root / PROCESSED_FILE, lambda f: torch.save(data, f), durable=True)
            if any(local_path(url) for file in spec.files for url in urls_for(file, name, base)):
                write_atomic(root / SOURCES_FILE, json.dumps(sources) + "\n")  # before the marker that trusts it
            else:
                (root / SOURCES_FILE).unlink(missing_ok=True)
            write_atomic(marker, fingerprint + "\n")
    except OSError as err:
        if err.errno == errno.ENOSPC:  # the one place a full disk is named (download() passes it on)
            raise DownloadError(f"no space left on device while preparing {name} in {root} ({step}): free some "
                                "space or pass --data.data_dir on a larger disk") from err
        raise
    finally:
        lock.release()
    return staged(root / PROCESSED_FILE, fingerprint)


def built_by(marker: Path) -> str | None:
    """The fingerprint a COMPLETE marker records (markers written before fingerprints hold "ok"), or None."""
    try:
        return marker.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):  # not built; or the data directory is a file (named later)
        return None


def load_prepared(path: Path) -> dict:
    """The tensors of a prepared data.pt. One that cannot be read (a disk that failed under it, a copy cut short)
    is named with the fix, rather than torch's bare `[Errno 22] Invalid argument` in every job that reads it."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:
        raise DownloadError(f"{path} cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:120]}): delete "
                            f"{path.parent} and run again, which rebuilds it") from None
