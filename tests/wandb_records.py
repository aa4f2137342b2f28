"""Reads an offline wandb run file (run-*.wandb) so tests can check what was logged, with no server.

The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks (crc32, length, type), each
holding a serialised wandb Record protobuf, split across blocks when long.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER, FULL, FIRST, MIDDLE, LAST = 32768, 7, 1, 2, 3, 4


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            records.append(record)
            pending = b""
        elif kind in (FIRST, MIDDLE):
            pending += chunk
    return records


def logged_history(path: str | Path) -> list[dict[str, str]]:
    """The history rows (wandb.log calls) of a run file, values as their JSON text."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def logged_config(path: str | Path) -> dict[str, str]:
    config = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = item.value_json
    return config


def wait_for_logged(path: str | Path, keys: set[str], timeout: float = 60) -> tuple[set[str], dict[str, str]]:
    """wandb's service process writes the file asynchronously, and under load it can finish a moment after
    wandb.finish() returns: poll until the history holds `keys` (or time runs out), then return what is there."""
    deadline = time.monotonic() + timeout
    while True:
        logged = {key for row in logged_history(path) for key in row}
        if keys <= logged or time.monotonic() > deadline:
            return logged, logged_config(path)
        time.sleep(0.5)
