"""How long does `sweep.py --status` take for a grid of 200 runs, without torch? Against a baseline measured in the
same run: reading the same files (each run's metrics.jsonl, cost.json, provenance.json, config.yaml) with no table.
Goal (issue 32): under 2 s, and no torch imported.

    python benchmarks/results_table.py            # 200 runs
    python benchmarks/results_table.py --runs 1000

Printed: the table's time (a fresh process: imports included, as a researcher on a login node sees it), the
baseline's, their ratio, and whether torch was imported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def write_runs(grid: Path, n: int) -> None:
    """A grid of n finished runs in the files train.py writes (support/training/run_record.py and friends)."""
    grid.mkdir()
    rows = [{"row": i, "config": {"model.hidden_dim": 16 + i, "optimizer.lr": 0.001 * (1 + i % 7)}, "argv": []}
            for i in range(n)]
    (grid / "grid.json").write_text(json.dumps({"rows": rows, "runs_per_gpu": 1}))
    (grid / "job.sbatch").write_text("#!/bin/sh\n")
    for i in range(n):
        run = grid / f"row-{i}"
        run.mkdir()
        (run / "done").write_text("{}")
        (run / "config.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"hidden_dim": 16 + i}}}))
        epochs = [{"epoch": e, "step": e, "time": e, "metrics": {"val/loss": 1 / (e + i + 1)}} for e in range(20)]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in
                                                     [{"monitor": "val/loss", "mode": "min"}, *epochs]) + "\n")
        (run / "cost.json").write_text(json.dumps({"attempts": [{"wall_s": 600.0, "gpus": 1, "gpu_hours": 0.17}]}))
        (run / "provenance.json").write_text(json.dumps({"attempts": [{"exit": 0, "end": "x", "code": {}}]}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp) / "grid-bench"
        write_runs(grid, args.runs)
        code = (f"import sys, time; start = time.perf_counter(); sys.path.insert(0, {str(ROOT)!r}); import sweep; "
                f"import contextlib, io\nwith contextlib.redirect_stdout(io.StringIO()) as out: "
                f"sweep.main(['--status', {str(grid)!r}])\n"
                f"print(time.perf_counter() - start, 'torch' in sys.modules, out.getvalue().count('row-'))")
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - start
        inner, torch_loaded, lines = result.stdout.split()
        start = time.perf_counter()
        for run in sorted(grid.glob("row-*")):
            for name in ("metrics.jsonl", "cost.json", "provenance.json"):
                [json.loads(line) for line in (run / name).read_text().splitlines()]
            yaml.safe_load((run / "config.yaml").read_text())
        baseline = time.perf_counter() - start
    print(f"sweep.py --status of a grid of {args.runs} runs: {wall:.2f} s in a fresh process ({float(inner):.2f} s "
          f"inside it), {lines} run lines, torch imported: {torch_loaded}")
    print(f"baseline, reading the same files: {baseline:.2f} s; the table / baseline: {wall / baseline:.1f}x")
    return 0 if torch_loaded == "False" else 1


if __name__ == "__main__":
    sys.exit(main())
