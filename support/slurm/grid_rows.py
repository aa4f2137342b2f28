"""A grid's rows before they are submitted: which distinct values to parse (each once), how many processes a row's
trainer.devices starts, and the arguments after `--` taking the place of a row's own value for the same key."""

from __future__ import annotations

import json
from typing import Any


def device_count(devices: Any, gpus: int) -> int | None:
    """How many processes per node Lightning starts for trainer.devices (None: cannot tell)."""
    if devices in ("auto", -1, "-1"):
        return gpus or 1
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    try:
        return int(devices)
    except (TypeError, ValueError):
        return None


def value_groups(rows: list[dict[str, Any]]) -> dict[str, dict[str, tuple[tuple[tuple[str, Any], ...], int]]]:
    """group (a key, or a class key with the keys below it) -> its distinct values (as JSON: a class value is a
    dict) -> those values and the first row that has them."""
    classes = {key for row in rows for key, value in row.items() if isinstance(value, dict)}

    def group_of(key: str) -> str:
        parts = key.split(".")
        return next((owner for i in range(1, len(parts)) if (owner := ".".join(parts[:i])) in classes), key)

    groups: dict[str, dict[str, tuple[tuple[tuple[str, Any], ...], int]]] = {}
    for index, row in enumerate(rows):
        members: dict[str, list[tuple[str, Any]]] = {}
        for key in sorted(row):
            members.setdefault(group_of(key), []).append((key, row[key]))
        for group, items in members.items():
            groups.setdefault(group, {}).setdefault(json.dumps(items, default=str), (tuple(items), index))
    return groups


def given_keys(extra: list[str]) -> set[str]:
    """The train.py keys that the arguments after `--` set (`--key=value` or `--key value`)."""
    return {arg[2:].split("=", 1)[0] for arg in extra if arg.startswith("--")}


def without_given(row: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    """The row without the keys that the arguments after `--` set again: those come last and win, so the row's own
    value would only repeat the key in every row's argv (`--trainer.max_epochs=30 --trainer.max_epochs=2`) and in
    grid.json say a value the run never used."""
    given = given_keys(extra)
    return {key: value for key, value in row.items() if key not in given}
