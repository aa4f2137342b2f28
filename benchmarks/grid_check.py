"""How long does checking a 1,600-row grid take before submission (issue 35: 3 min 54 s at 100% CPU, one parse per
row), now that each parse takes the next distinct value of every key, against the old way, measured in the same run?
Goal: under 10 s for the check.

    python benchmarks/grid_check.py            # the old way timed on --sample parses (default 40), extrapolated
    python benchmarks/grid_check.py --full     # the old way timed whole (about 3-4 minutes on 2 cores)

The grid is four model.* keys of 10x10x4x4 values. The old way grouped keys by their first word, so every row was
a new combination of the "model" group: 1 + 9 + 9 + 3 + 3 = 25 parses in sweep.validate (each value alone) and
1,600 in slurm_train.check_rows. The new way: 10 and 10. Importing train.py (torch, Lightning) is timed apart: it is
paid once per command whatever the grid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("OMP_NUM_THREADS", "1")

GRID = {"name": "bench-1600", "program": "train.py", "method": "grid",
        "parameters": {"model.hidden_dim": {"values": [8 * (i + 1) for i in range(10)]},
                       "model.dropout": {"values": [round(0.05 * i, 2) for i in range(10)]},
                       "model.channels": {"values": [4, 8, 12, 16]},
                       "model.depth": {"values": [1, 2, 3, 4]},
                       "trainer.max_epochs": {"value": 1}}}
RESOURCES = {"ntasks_per_node": 1, "gpus_per_node": 0, "nodes": 1}


def old_parses(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The argv of every parse the old check_rows made: one per distinct combination of a first-word group."""
    import sweep

    groups: dict[str, dict[str, tuple]] = {}
    for index, row in enumerate(rows):
        for prefix in sorted({key.split(".")[0] for key in row}):
            items = tuple(sorted((k, v) for k, v in row.items() if k.split(".")[0] == prefix))
            groups.setdefault(prefix, {}).setdefault(json.dumps(items), (items, index))
    tables = [list(values.values()) for values in groups.values()]
    return [sweep.to_argv({k: v for table in tables for k, v in table[j % len(table)][0]})
            for j in range(max(len(table) for table in tables))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=40, help="old-way parses timed, the rest extrapolated")
    parser.add_argument("--full", action="store_true", help="time every parse of the old way")
    args = parser.parse_args()

    start = time.perf_counter()
    import slurm_train
    import sweep

    sweep.train_config([])  # torch, Lightning and train.py's parser loaded once, as in any command
    imported = time.perf_counter() - start

    start = time.perf_counter()
    _, rows = slurm_train.enumerate_rows(GRID, None, 0)  # sweep.validate's parses, then the grid's rows
    slurm_train.check_rows(rows, [], RESOURCES)
    new = time.perf_counter() - start

    old_argvs = old_parses(rows)
    old_validate = 1 + sum(len(spec.get("values", [0])) - 1 for spec in GRID["parameters"].values())
    timed = old_argvs if args.full else old_argvs[:args.sample]
    start = time.perf_counter()
    for argv in timed:
        sweep.train_config(argv)
    per_parse = (time.perf_counter() - start) / len(timed)
    old = per_parse * (len(old_argvs) + old_validate)
    how = "timed whole" if args.full else f"{len(timed)} parses timed, {per_parse:.3f} s each, extrapolated"

    print(f"grid of {len(rows)} rows (model.* 10x10x4x4); importing train.py: {imported:.1f} s (once per command)")
    print(f"new: {new:.1f} s to validate and check every row")
    print(f"old: {old:.0f} s for {old_validate} + {len(old_argvs)} parses ({how})")
    print(f"ratio: {old / new:.0f}x faster; goal under 10 s: {'met' if new < 10 else 'NOT met'}")


if __name__ == "__main__":
    main()
