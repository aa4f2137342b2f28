"""An offline search's directory: wandb's sweep engine (the `sweeps` package) driven from one record file per run,
with no server. slurm_train.py --search creates it; support/search/worker.py runs it; sweep.py --status reads it.

    SEARCH_DIR/search.json      the sweep config, the count, the arguments for every run (written once)
    SEARCH_DIR/run-0007.json    run 7's record: settings, state, per-epoch history of the metric, heartbeat
    SEARCH_DIR/run-0007/        run 7's run directory (train.py's --run_dir)
    SEARCH_DIR/search.lock      held only while a run is proposed

The records are the truth: each is small and written whole (temporary name, then rename), so no single file's
corruption loses the search. A proposal reads every record, asks `sweeps.next_run`, and writes the new run's record,
under a lock that works where flock does not (NFS, Lustre without -o flock): filelock's SoftFileLease, an exclusively
created marker that a peer takes over when its holder died on this host or stopped refreshing it for a minute.

States: running (its worker trains it), preempted (stopped by a signal: Slurm requeue, time limit, scancel; resumed
by its requeued task, or by any worker once its owner is gone: a resumed search), finished, stopped (finished early
by hyperband), failed (train.py exited non-zero) and crashed (its worker vanished without a word: its process is
gone, its Slurm task left the queue, or, where neither can be checked, no heartbeat for heartbeat_timeout seconds).
The engine sees stopped as finished, preempted as in flight, and imputes crashed and failed as bad results.
Light on purpose (no torch): sweep.py --status runs on login nodes.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from support.atomic import write_atomic
from support.search.space import plain, random_draws

SEARCH_FILE, LOCK_FILE = "search.json", "search.lock"
RECORD_ENV = "SEARCH_RUN_RECORD"  # the record of the run train.py is training (set by the worker)
IN_FLIGHT = ("running", "preempted")
ENGINE_STATE = {"running": "running", "preempted": "preempted", "finished": "finished", "stopped": "finished",
                "failed": "failed", "crashed": "crashed"}
HEARTBEAT_SECONDS = 30.0  # how often a worker refreshes its run's record; heartbeat_timeout is 20x this by default
LOCK_LEASE_SECONDS = 60.0  # a lock holder on another node that stops refreshing for this long is taken over


class SearchError(ValueError):
    """A search directory that cannot be used; the message is one line that names the fix."""


def load_search(search_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((search_dir / SEARCH_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise SearchError(f"{search_dir} is not a search directory (no {SEARCH_FILE}): give the directory that "
                          "slurm_train.py --search printed") from None
    except (OSError, ValueError) as err:
        raise SearchError(f"cannot read {search_dir / SEARCH_FILE} ({err}): it is written once when the search is "
                          "created; restore it from the job script's settings or start a new search") from None


def create_search(search_dir: Path, settings: dict[str, Any]) -> None:
    """Writes search.json into a new directory; its settings never change afterwards."""
    search_dir.mkdir(parents=True)
    write_atomic(search_dir / SEARCH_FILE, json.dumps(settings, indent=1) + "\n", durable=True)


def record_path(search_dir: Path, number: int) -> Path:
    return search_dir / f"run-{number:04d}.json"


NUMBER = (int, float)
# What every record holds, and of which types: a record edited by hand or damaged otherwise ("best": "abc",
# "history": null, a JSON list) used to stop sweep.py --status and a resume with a TypeError or AttributeError.
RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "number": (int,), "name": (str,), "config": (dict,), "state": (str,), "owner": (dict, type(None)),
    "attempts": (int,), "created": NUMBER, "ended": (*NUMBER, type(None)), "history": (list,),
    "best": (*NUMBER, type(None)), "stopped_early": (bool,), "exit_code": (int, type(None)), "test": (dict,)}
OWNER_FIELDS = ("host", "pid", "worker", "slurm_task")
QUARANTINED = ".quarantined"  # a damaged record's new suffix: kept for a person to read, out of the search
_warned: set[tuple[Path, str]] = set()


def check_record(record: Any, path: Path) -> dict[str, Any]:
    """The record, if it is one (the fields above, of their types, its state known, its number its file's), else
    ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"it holds a JSON {type(record).__name__}, not a run record")
    for key, types in RECORD_FIELDS.items():
        value = record.get(key)
        if key not in record or not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            kinds = "/".join("null" if t is type(None) else t.__name__ for t in types)
            raise ValueError(f'its "{key}" is {json.dumps(value)[:40]}, not {kinds}')
    if record["state"] not in ENGINE_STATE:
        raise ValueError(f'its "state" {record["state"]!r} is none of {", ".join(ENGINE_STATE)}')
    if record["owner"] is not None and any(key not in record["owner"] for key in OWNER_FIELDS):
        raise ValueError(f'its "owner" lacks one of {", ".join(OWNER_FIELDS)}')
    if not all(isinstance(entry, dict) for entry in record["history"]):
        raise ValueError('its "history" holds something other than epochs')
    if path.name != f"run-{record['number']:04d}.json":
        raise ValueError(f'its "number" {record["number"]} is not its file\'s')
    return record


def read_record(path: Path) -> dict[str, Any]:
    record = check_record(json.loads(path.read_text()), path)
    # The worker refreshes the heartbeat as the file's time (a rewrite would race train.py adding an epoch).
    record["heartbeat"] = max(record.get("heartbeat") or 0.0, path.stat().st_mtime)
    return record


def record_numbers(search_dir: Path) -> list[int]:
    """The numbers of all runs, from the records' names: a record that cannot be read, or was quarantined, still holds
    its number (a new run given it would share its run directory)."""
    paths = [*search_dir.glob("run-[0-9]*.json"), *search_dir.glob(f"run-[0-9]*.json{QUARANTINED}")]
    return sorted({int(path.name.split(".")[0].removeprefix("run-")) for path in paths})


def read_records(search_dir: Path, quarantine: bool = False) -> list[dict[str, Any]]:
    """Every record, by run number. One that cannot be read or is not a record (a damaged disk, a file edited by
    hand) is skipped with a warning: the others are complete on their own. `quarantine` (a worker, under the search's
    lock) also renames it to run-NNNN.json.quarantined, so it is reported once and the search goes on without it."""
    records = []
    for path in sorted(search_dir.glob("run-[0-9]*.json")):
        try:
            records.append(read_record(path))
        except (OSError, ValueError) as err:
            if quarantine:
                path.replace(path.with_name(path.name + QUARANTINED))
            kept = f"; moved to {path.name}{QUARANTINED}" if quarantine else ""
            if (path, str(err)) not in _warned:  # once per process: --status reads the records more than once
                _warned.add((path, str(err)))
                print(f"warning: skipping the search record {path}: {err}{kept}", file=sys.stderr, flush=True)
    return records


def write_record(search_dir: Path, record: dict[str, Any]) -> Path:
    path = record_path(search_dir, record["number"])
    write_atomic(path, json.dumps({**record, "heartbeat": time.time()}, indent=1) + "\n")
    return path


def heartbeat(path: Path) -> None:
    os.utime(path)


def owner_identity(worker: int) -> dict[str, Any]:
    """Who runs a run: this process, and the Slurm array task that a requeue brings back under the same id."""
    job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    slurm_task = f"{job}_{task}" if job and task else os.environ.get("SLURM_JOB_ID")
    return {"host": socket.gethostname(), "pid": os.getpid(), "worker": worker, "slurm_task": slurm_task}


def is_own(record: dict[str, Any], owner: dict[str, Any]) -> bool:
    """Whether `owner` (a requeued array task, or the same local worker slot) left this run unfinished."""
    mine = record["owner"]
    if owner["slurm_task"] is not None:  # and the same worker of the task: a packed task runs several
        return mine["slurm_task"] == owner["slurm_task"] and mine["worker"] == owner["worker"]
    return mine["slurm_task"] is None and mine["host"] == owner["host"] and mine["worker"] == owner["worker"]


def queued_slurm_tasks() -> set[str] | None:
    """Slurm's queued and running jobs and array tasks ('123', '123_4'), or None without Slurm here."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return set(out.stdout.split()) if out.returncode == 0 else None


def owner_alive(owner: dict[str, Any], queued: set[str] | None) -> bool | None:
    """Whether the run's owner can still finish it: its process on this host, or its Slurm task in the queue (a
    requeued task waits there). None when this machine cannot tell (another host, no Slurm here)."""
    if owner["slurm_task"] is not None and queued is not None:
        return owner["slurm_task"] in queued
    if owner["host"] == socket.gethostname() and owner["slurm_task"] is None:
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return None


def owner_gone(record: dict[str, Any], timeout: float, queued: set[str] | None, now: float) -> bool:
    """Whether the run's owner can no longer finish it: its process is gone (this host), its Slurm task has left the
    queue, or (where neither can be checked) its heartbeat is older than `timeout`."""
    alive = owner_alive(record["owner"], queued)
    return alive is False or (alive is None and now - record["heartbeat"] > timeout)


def effective_state(record: dict[str, Any], timeout: float, queued: set[str] | None, now: float) -> str:
    """The record's state, with a running run whose owner vanished without a word seen as crashed. A preempted run
    stays preempted: it stopped cleanly with a checkpoint, and the next worker (or a resumed search) continues it."""
    if record["state"] == "running" and owner_gone(record, timeout, queued, now):
        return "crashed"
    return record["state"]


def best_value(history: list[dict[str, Any]], metric: str, goal: str) -> float | None:
    values = [entry[metric] for entry in history if isinstance(entry.get(metric), (int, float))
              and math.isfinite(entry[metric])]
    if not values:
        return None
    return max(values) if goal == "maximize" else min(values)


def engine() -> Any:
    """wandb's sweep engine, imported when first needed: it brings numpy, scipy and scikit-learn (0.3 s), which a
    run reporting an epoch without early stopping, or sweep.py --status, does without."""
    with warnings.catch_warnings():  # sweeps 0.2.0 declares pydantic-v1 settings, which pydantic 2 warns about
        warnings.simplefilter("ignore", UserWarning)
        import sweeps
    return sweeps


def engine_runs(records: list[dict[str, Any]], metric: str) -> list[Any]:
    """The records as the engine's SweepRuns. Only the aliases reach it under pydantic 2 (summary_metrics= and
    history= are dropped silently, measured with sweeps 0.2.0), so each result goes in as summaryMetrics (the best
    value) and sampledHistory (one entry per validation epoch, what hyperband counts)."""
    runs = []
    for record in records:
        summary = {metric: record["best"]} if record.get("best") is not None else {}
        runs.append(engine().SweepRun(
            name=record["name"], state=ENGINE_STATE[record["state"]],
            config={key: {"value": value} for key, value in record["config"].items()},
            summaryMetrics=summary, sampledHistory=[{metric: e[metric]} for e in record["history"] if metric in e]))
    return runs


@contextmanager
def search_lock(search_dir: Path, timeout: float = 600.0) -> Iterator[None]:
    from filelock import SoftFileLease, Timeout

    lock = SoftFileLease(str(search_dir / LOCK_FILE), lease_duration=LOCK_LEASE_SECONDS, timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise SearchError(f"{search_dir / LOCK_FILE} was held for over {timeout:.0f} s: a worker on another node may "
                          "hang while proposing; remove the file if no worker is running") from None
    try:
        yield
    finally:
        lock.release()


def mark_vanished(search_dir: Path, records: list[dict[str, Any]], timeout: float, queued: set[str] | None) -> None:
    """Rewrites the records of runs whose owner vanished as crashed (in place, in `records` too)."""
    now = time.time()
    for record in records:
        if record["state"] == "running" and effective_state(record, timeout, queued, now) == "crashed":
            record.update(state="crashed", ended=now, note="its worker vanished (no process, job or heartbeat)")
            write_record(search_dir, record)


def claim_or_propose(search_dir: Path, owner: dict[str, Any]) -> dict[str, Any] | None:
    """Under the lock: this owner's own unfinished run (a requeued task), else a preempted run whose owner is gone
    (a resumed search), else a new run from the engine while the search has fewer than `count` runs. None: nothing
    left to do."""
    search = load_search(search_dir)
    with search_lock(search_dir):
        records = read_records(search_dir, quarantine=True)
        slurm_owners = any(r["owner"]["slurm_task"] for r in records if r["state"] in IN_FLIGHT)
        queued = queued_slurm_tasks() if slurm_owners else None
        mark_vanished(search_dir, records, search["heartbeat_timeout"], queued)
        own = [r for r in records if r["state"] in (*IN_FLIGHT, "crashed") and is_own(r, owner)]
        now = time.time()
        orphans = [r for r in records if r["state"] == "preempted"
                   and owner_gone(r, search["heartbeat_timeout"], queued, now)]
        if own or orphans:
            record = (own or orphans)[0]
            record.update(state="running", owner=owner, attempts=record["attempts"] + 1, ended=None)
            write_record(search_dir, record)
            return record
        # The count is of runs with a record; a quarantined one keeps its number (and run directory) but is no run of
        # the search: counted, it ended the search short of its count ("worker ends after 0 run(s)").
        if len(records) >= search["count"]:
            return None
        record = propose(search, records, max(record_numbers(search_dir), default=0) + 1)
        if record is not None:
            record.update(owner=owner, attempts=1)
            write_record(search_dir, record)
        return record


def propose(search: dict[str, Any], records: list[dict[str, Any]], number: int) -> dict[str, Any] | None:
    """Run `number`'s record (not yet written), or None when a grid is exhausted. The engine draws from the global
    random generators: they are seeded with the search's seed and the run number, so a search can be replayed."""
    import numpy as np

    config = search["sweep"]
    states = random.getstate(), np.random.get_state()
    random.seed(search["seed"] * 100_003 + number)
    np.random.seed((search["seed"] * 100_003 + number) % 2**32)
    try:
        with warnings.catch_warnings():  # scikit-learn's Gaussian process warns on every fit near a length bound
            warnings.simplefilter("ignore")
            if config["method"] == "random":  # wandb's draws, without repeating a run while unseen points remain
                [settings] = random_draws(config["parameters"], 1, seen=[r["config"] for r in records])
            elif (run := engine().next_run(config, engine_runs(records, config["metric"]["name"]))) is None:
                return None
            else:
                settings = {key: plain(item["value"]) for key, item in sorted(run.config.items())}
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    now = time.time()
    return {"number": number, "name": f"run-{number:04d}", "config": settings, "state": "running",
            "owner": None, "attempts": 0, "created": now, "ended": None, "history": [], "best": None,
            "stopped_early": False, "exit_code": None, "test": {}}


def report_epoch(path: Path, epoch: int, value: float) -> bool:
    """Called by the run itself after each validation epoch: adds the metric to its record and returns whether
    hyperband stops it (the record then says so). The run is its record's one writer while it trains, so this needs no
    lock; the others' records are read as they are (each is whole)."""
    search = load_search(path.parent)
    metric, goal = search["sweep"]["metric"]["name"], search["sweep"]["metric"]["goal"]
    record = read_record(path)
    # An epoch run again after a resume (stopped between this report and its checkpoint) replaces its first report:
    # hyperband counts one iteration per entry.
    record["history"] = [entry for entry in record["history"] if entry.get("epoch") != epoch]
    record["history"].append({"epoch": epoch, metric: value})
    record["best"] = best_value(record["history"], metric, goal)
    if "early_terminate" not in search["sweep"]:
        write_record(path.parent, record)
        return False
    others = [r for r in read_records(path.parent) if r["number"] != record["number"]]
    stop = engine().stop_runs(search["sweep"], engine_runs([*others, record], metric))
    record["stopped_early"] = any(run.name == record["name"] for run in stop)
    write_record(path.parent, record)
    return record["stopped_early"]


def report_test(path: Path, metrics: dict[str, float]) -> None:
    record = read_record(path)
    record["test"] = metrics
    write_record(path.parent, record)
