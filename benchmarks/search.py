"""How long does an offline search (support/search/records.py) take to propose a run as its records pile up?

    python benchmarks/search.py          # ~30 s on 2 CPU cores

A bayes search over 4 parameters (sweep.py's SWEEP_CONFIG, with distributions) is timed with 10, 100 and 500 finished
records in its directory (random settings, 20 epochs of val/loss each), and a random search at 500 as the baseline,
in the same run. Medians of 5 calls after one warm-up call, in seconds:
  proposal  claim_or_propose whole: load search.json, lock, read every record, next_run, write the record, unlock
            (the new record is deleted after each call, so the count stays)
  read      read_records alone;  engine  propose alone (records -> SweepRuns -> next_run)
  lock      an uncontended acquire + release of the search's lock, nothing inside (median of 20)
  hold      the lock's hold time in a proposal, acquire returning to release starting (search_lock is wrapped with a
            timer in this process; claim_or_propose looks the name up when called); outside = proposal - hold
Contention: 4 spawned processes, warmed up then released together, propose 10 runs each in one bayes search that
starts at 100 records; each marks its run finished before its next proposal (else it gets its own running run back),
so it ends at 140. Reported: wall time of all 40, the sum of their hold times, and the mean wait in acquire.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.search import records as search_records  # noqa: E402
from support.search.launch import new_search  # noqa: E402
from support.search.records import claim_or_propose, load_search, propose, read_records, record_path, write_record  # noqa: E402

PARAMETERS = {"model.hidden_dim": {"values": [64, 128, 256]},
              "model.dropout": {"distribution": "uniform", "min": 0.0, "max": 0.5},
              "optimizer.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
              "data.batch_size": {"values": [32, 64, 128]}}
METRIC = {"name": "val/loss", "goal": "minimize"}
REPEATS, WORKERS, PROPOSALS_EACH, AIM_SECONDS = 5, 4, 10, 2.0
LOCK_TIMES: list[tuple[float, float]] = []  # (wait in acquire, hold) of every lock taken through search_lock
UNTIMED_LOCK = search_records.search_lock


@contextmanager
def timed_lock(search_dir: Path, timeout: float = 600.0) -> Iterator[None]:
    start = time.perf_counter()
    with UNTIMED_LOCK(search_dir, timeout):
        acquired = time.perf_counter()
        try:
            yield
        finally:
            LOCK_TIMES.append((acquired - start, time.perf_counter() - acquired))


search_records.search_lock = timed_lock  # at import, so the spawned workers are timed too


def owner(worker: int) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "worker": worker, "slurm_task": None}


def finish(search_dir: Path, record: dict[str, Any], rng: random.Random, epochs: int = 20) -> None:
    """Writes `record` as a finished run: a loss curve whose floor depends on the settings, plus noise."""
    config = record["config"]
    floor = 0.25 + 0.08 * abs(math.log10(config["optimizer.lr"]) + 2.5) + 0.3 * config["model.dropout"] ** 2
    history = [{"epoch": e, "val/loss": floor + 2.0 * 0.8 ** e + rng.gauss(0, 0.02)} for e in range(epochs)]
    record.update(state="finished", history=history, best=min(h["val/loss"] for h in history), exit_code=0,
                  ended=time.time(), test={"test/loss": history[-1]["val/loss"]})
    write_record(search_dir, record)


def make_search(root: Path, method: str, records: int, name: str = "") -> Path:
    search_dir = root / (name or f"{method}-{records}")
    new_search(search_dir, {"method": method, "metric": METRIC, "parameters": PARAMETERS}, count=1_000_000, seed=0,
               extra=[], heartbeat_timeout=600.0, program=["true"])
    rng = random.Random(records)
    for number in range(1, records + 1):
        config = {"model.hidden_dim": rng.choice([64, 128, 256]), "model.dropout": rng.uniform(0.0, 0.5),
                  "optimizer.lr": 10 ** rng.uniform(-4, -1), "data.batch_size": rng.choice([32, 64, 128])}
        finish(search_dir, {"number": number, "name": f"run-{number:04d}", "config": config, "owner": owner(0),
                            "attempts": 1, "created": time.time(), "stopped_early": False}, rng)
    return search_dir


def median_seconds(call: Callable[[], object], repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(search_dir: Path) -> dict[str, float]:
    search, records = load_search(search_dir), read_records(search_dir)
    proposals, holds = [], []
    for repeat in range(REPEATS + 1):  # the first is the warm-up
        LOCK_TIMES.clear()
        start = time.perf_counter()
        record = claim_or_propose(search_dir, owner(0))
        seconds = time.perf_counter() - start
        assert record is not None and len(LOCK_TIMES) == 1, (record, LOCK_TIMES)
        record_path(search_dir, record["number"]).unlink()
        if repeat:
            proposals.append(seconds)
            holds.append(LOCK_TIMES[0][1])

    def lock_alone() -> None:
        with UNTIMED_LOCK(search_dir):
            pass

    return {"proposal": statistics.median(proposals), "read": median_seconds(lambda: read_records(search_dir)),
            "engine": median_seconds(lambda: propose(search, records, len(records) + 1)),
            "lock": median_seconds(lock_alone, 20), "hold": statistics.median(holds)}


def contend(search_dir: Path, worker: int, barrier: Any, results: Any) -> None:
    records = read_records(search_dir)
    propose(load_search(search_dir), records, len(records) + 1)  # warm-up: imports the engine
    rng = random.Random(worker)
    barrier.wait(timeout=120)
    LOCK_TIMES.clear()
    for _ in range(PROPOSALS_EACH):
        record = claim_or_propose(search_dir, owner(worker))
        assert record is not None and record["attempts"] == 1, record  # a new run, not its own one back
        finish(search_dir, record, rng)
    results.put(list(LOCK_TIMES))


def contention(search_dir: Path) -> tuple[float, list[tuple[float, float]], int]:
    """Wall seconds of all the proposals, (wait, hold) of each, and the records at the end."""
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(WORKERS + 1), context.Queue()
    workers = [context.Process(target=contend, args=(search_dir, w, barrier, results)) for w in range(WORKERS)]
    for process in workers:
        process.start()
    barrier.wait(timeout=120)  # a worker that failed while warming up breaks it
    start = time.perf_counter()
    times = [pair for _ in workers for pair in results.get(timeout=120)]
    wall = time.perf_counter() - start
    for process in workers:
        process.join()
        assert process.exitcode == 0, process.exitcode
    return wall, times, len(read_records(search_dir))


def main() -> None:
    cases = [("bayes", 10), ("bayes", 100), ("bayes", 500), ("random", 500)]
    with tempfile.TemporaryDirectory() as tmp:
        results = {case: measure(make_search(Path(tmp), *case)) for case in cases}
        wall, times, final = contention(make_search(Path(tmp), "bayes", 100, "contended"))
    print(f"seconds, median of {REPEATS} (lock: of 20); hold = lock held during the proposal (read + engine + write)")
    print(f"{'method':<8}{'records':>8}{'proposal':>10}{'read':>8}{'engine':>8}{'lock':>8}{'hold':>8}{'outside':>9}")
    for (method, count), r in results.items():
        print(f"{method:<8}{count:>8}{r['proposal']:>10.3f}{r['read']:>8.4f}{r['engine']:>8.3f}{r['lock']:>8.4f}"
              f"{r['hold']:>8.3f}{r['proposal'] - r['hold']:>9.3f}")
    held = sum(hold for _, hold in times)
    print(f"contention: {WORKERS} processes x {PROPOSALS_EACH} bayes proposals, 100 -> {final} records: {wall:.2f} s "
          f"wall, lock held {held:.2f} s of it ({held / wall:.0%}),\n  mean wait in acquire "
          f"{statistics.mean(wait for wait, _ in times):.3f} s per proposal, mean hold {held / len(times):.3f} s")
    bayes, baseline = results[("bayes", 500)]["proposal"], results[("random", 500)]["proposal"]
    print(f"bayes / random proposal at 500 records = {bayes / baseline:.2f}  ({bayes:.3f} s / {baseline:.3f} s)")
    verdict = "meets" if bayes < AIM_SECONDS else "misses"
    print(f"bayes proposal at 500 records: {bayes:.3f} s, {verdict} the aim of < {AIM_SECONDS:.0f} s "
          f"({AIM_SECONDS / bayes:.1f}x headroom)")


if __name__ == "__main__":
    main()
