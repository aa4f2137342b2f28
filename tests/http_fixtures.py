"""Test helpers for downloads: a local HTTP file server with switchable failures, dataset declarations made of
random files (for support/data/downloads.py, without datamodule.py), and files in the example datasets' real on-disk
formats (gzipped IDX for MNIST and Fashion-MNIST, the pickle tarball for CIFAR-10)."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import re
import socket
import struct
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch

from support.data.downloads import RemoteFile, prepare_dataset, remote_files

MODES = ("ok", "404", "silent", "stall", "trickle", "truncate", "drop", "wrong")


class FileServer:
    """Serves `files` (name -> bytes) on 127.0.0.1 at <url>/<name> (any directory before the name works too),
    with Range requests, a count of requests per file name, and a failure mode:

        ok        serve the file
        404       answer 404 Not Found
        silent    accept the connection and never answer (until the server closes)
        stall     send the headers and half the body, then nothing (until the server closes)
        trickle   send the body a byte every 50 ms (a socket timeout never fires)
        truncate  promise the whole length but send 100 bytes less, then close cleanly
        drop      send half the body, then reset the connection
        wrong     send other bytes of the same length (a checksum mismatch)

    `failures=N` applies the mode to the first N body transfers only, then serves normally. pySmartDL reads
    bodies only through ranged requests; its `bytes=0-3` range-support probe is not a body transfer.
    """

    def __init__(self, files: dict[str, bytes], mode: str = "ok", failures: int | None = None) -> None:
        assert mode in MODES, mode
        self.files, self.mode, self.failures = files, mode, failures
        self.requests: Counter[str] = Counter()
        self.ranges: list[tuple[str, str]] = []
        self._lock, self._closing = threading.Lock(), threading.Event()
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.owner = self
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def _mode_for(self, name: str, byte_range: str | None) -> str:
        with self._lock:
            self.requests[name] += 1
            if byte_range:
                self.ranges.append((name, byte_range))
            if self.failures is not None and self.failures <= 0:
                return "ok"
            if self.failures is not None and byte_range and byte_range != "bytes=0-3":
                self.failures -= 1
            return self.mode

    def close(self) -> None:
        self._closing.set()  # wakes stalled handlers
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64
    owner: FileServer

    def handle_error(self, request, client_address) -> None:  # clients that hang up are part of the tests
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        name = self.path.rsplit("/", 1)[-1]
        byte_range = self.headers.get("Range")
        mode = owner._mode_for(name, byte_range)
        data = owner.files.get(name)
        if mode == "silent":
            owner._closing.wait(60)
            return
        if data is None or mode == "404":
            self.send_error(404)
            return
        if mode == "wrong":
            data = bytes(255 - b for b in data[:64]) + data[64:]
        start, end = 0, len(data) - 1
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", byte_range or "")
        if match:
            start, end = int(match[1]), min(int(match[2] or end), end)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:end + 1]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        try:
            if mode in ("ok", "wrong"):
                self.wfile.write(body)
            elif mode == "truncate":
                self.wfile.write(body[:-100] if len(body) > 200 else body[:len(body) // 2])
            elif mode == "stall":
                self.wfile.write(body[:len(body) // 2])
                owner._closing.wait(60)
            elif mode == "trickle":
                for i in range(len(body)):
                    if owner._closing.wait(0.05):
                        break
                    self.wfile.write(body[i:i + 1])
            elif mode == "drop":
                self.wfile.write(body[:len(body) // 2])
                # Close with linger 0: the client gets a reset, not a clean end of file.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.rfile.close()
                self.connection.close()
        except OSError:
            pass


def refused_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def idx_gz(array: np.ndarray) -> bytes:
    """uint8 array -> MNIST's gzipped IDX format."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    return gzip.compress(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes(), compresslevel=1, mtime=0)


def mnist_files(n_train: int, n_test: int, seed: int = 0) -> tuple[dict[str, bytes], dict[str, torch.Tensor]]:
    """Random MNIST-shaped files (also Fashion-MNIST's) and the tensors they hold."""
    rng = np.random.default_rng(seed)
    x, x_test = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for n in (n_train, n_test))
    y, y_test = (rng.integers(0, 10, n, dtype=np.uint8) for n in (n_train, n_test))
    files = {"train-images-idx3-ubyte.gz": idx_gz(x), "train-labels-idx1-ubyte.gz": idx_gz(y),
             "t10k-images-idx3-ubyte.gz": idx_gz(x_test), "t10k-labels-idx1-ubyte.gz": idx_gz(y_test)}
    tensors = {"x": torch.from_numpy(x).unsqueeze(1), "y": torch.from_numpy(y).long(),
               "x_test": torch.from_numpy(x_test).unsqueeze(1), "y_test": torch.from_numpy(y_test).long()}
    return files, tensors


def cifar10_files(per_batch: int, seed: int = 0) -> tuple[dict[str, bytes], dict[str, torch.Tensor]]:
    """A CIFAR-10 "python version" tarball (5 training batches and a test batch, pickled as the real one is)."""
    rng = np.random.default_rng(seed)
    buffer, batches = io.BytesIO(), {}
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
            if name == "batches.meta":
                entry = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                         "ship", "truck"], "num_cases_per_batch": per_batch}
            else:
                data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
                labels = rng.integers(0, 10, per_batch).tolist()
                entry = {"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
                batches[name] = (torch.from_numpy(data).reshape(-1, 3, 32, 32), torch.tensor(labels))
            payload = pickle.dumps(entry, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    tensors = {"x": torch.cat([x for x, _ in train]), "y": torch.cat([y for _, y in train]),
               "x_test": batches["test_batch"][0], "y_test": batches["test_batch"][1]}
    return {"cifar-10-python.tar.gz": buffer.getvalue()}, tensors


@dataclass(frozen=True)
class Declaration:
    """A dataset declaration as support.data.downloads.prepare_dataset takes one: its files and how to build tensors."""

    files: tuple[RemoteFile, ...]
    build: Callable[[Path], dict[str, torch.Tensor]]


def sha256s(files: dict[str, bytes]) -> dict[str, str]:
    """The files' checksums, as a declaration holds them."""
    return {name: "sha256:" + hashlib.sha256(data).hexdigest() for name, data in files.items()}


def as_tensors(files: dict[str, bytes]) -> dict[str, torch.Tensor]:
    """Each file's bytes as a uint8 tensor under its name: what a Declaration from declare() builds."""
    return {name: torch.frombuffer(bytearray(data), dtype=torch.uint8) for name, data in files.items()}


def read_back(names: tuple[str, ...], raw: Path) -> dict[str, torch.Tensor]:
    return as_tensors({name: (raw / name).read_bytes() for name in names})


def random_files(sizes: dict[str, int], seed: int = 0) -> tuple[dict[str, bytes], dict[str, torch.Tensor]]:
    """Files of random bytes (name -> size), and the tensors a Declaration from declare() builds from them."""
    rng = np.random.default_rng(seed)
    files = {name: rng.integers(0, 256, size, dtype=np.uint8).tobytes() for name, size in sizes.items()}
    return files, as_tensors(files)


def declare(mirrors: list[str], files: dict[str, bytes]) -> Declaration:
    """A declaration of `files` as a user would write one: the files' sha256 checksums, our mirrors, and a build
    that reads each file back into a tensor (so data.pt holds exactly the bytes that were served)."""
    return Declaration(remote_files(mirrors, sha256s(files)), partial(read_back, tuple(files)))


def digest(tensors: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(tensors[k].numpy().tobytes() for k in sorted(tensors))).hexdigest()


def prepare_in_child(files_dir: str, url: str, data_dir: str, sync: str, out: str) -> None:
    """One of several processes that prepare one dataset at once (see test_datasets.py): declares it, waits for
    the others, prepares it and writes what it printed and the digest of the data it loaded to `out`."""
    torch.set_num_threads(1)  # several torch processes on 2 cores: one thread each, or all crawl
    files = {p.name: p.read_bytes() for p in sorted(Path(files_dir).iterdir())}
    declaration = declare([url], files)
    sys.stdout = open(out, "w")  # noqa: SIM115 (closed when the process exits)
    Path(sync, f"ready-{out.rsplit('-', 1)[-1]}").touch()
    while not Path(sync, "go").exists():  # start together, to make the race as tight as possible
        time.sleep(0.005)
    data = torch.load(prepare_dataset("race", declaration, data_dir), weights_only=True)
    print("digest", digest(data), flush=True)
