"""Run a sweep's configs offline as ONE Slurm job array: one array task per config, one train.py run each.

    python slurm_train.py --dry-run                          # check the grid, print the sbatch script and the runs
    python slurm_train.py                                    # the grid of sweep.py's SWEEP_CONFIG, 4 rows at a time
    python slurm_train.py --sample 20 --seed 0               # 20 seeded random draws instead of the grid
    python slurm_train.py --max-concurrent 8 --time 02:00:00 --gpus-per-node 2 -- --trainer.max_epochs=5
    python slurm_train.py --preset bede --account myproject  # cluster presets: hec, bede (check partition names)
    python slurm_train.py --resume runs/grid-20260101-120000-abc123   # resubmit only the rows not finished
    python slurm_train.py --local                            # no Slurm: the same rows as processes on this machine
    python slurm_train.py --search --count 40 --max-concurrent 8   # the sweep's own method (bayes, hyperband) by 8
                                                             # workers sharing runs/search-<time>-<random>/, no server
    python sweep.py --status runs/search-20261202-140000-abc123    # a search's runs, best first, and status.png

Everything comes from sweep.SWEEP_CONFIG (or --sweep-config FILE, JSON or YAML). Arguments after `--` are added to
every row's train.py arguments. Each grid gets a new directory, runs/grid-<time>-<random>/, holding grid.json
(every row's config and train.py argv), job.sbatch (the script submitted), row-<i>.out (each task's log) and
row-<i>/ (that run's directory). A row is finished when row-<i>/done exists: the task writes it only after train.py
exited 0, so a crashed, cancelled or preempted row is not finished and a requeued task resumes its own checkpoints.
Every row is checked as train.py would check it (constructors included) before anything is written or submitted.
A search (--search) writes search.json, job.sbatch (K workers, support/search_worker.py), worker-<i>.out, and per run
run-NNNN.json (its record), run-NNNN.out and run-NNNN/; see README.md, "Offline search".
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import sweep
from support.atomic import write_atomic
from support.errors import one_line
from support.local_rows import run_local, stop_orphans
from support.runs import tasks_devices_mismatch, timestamped_name
from support.search_launch import extra_problem, new_search, render_search_script, unfinished_search
from support.search_records import SEARCH_FILE
from support.slurm_jobs import LaunchError, active_jobs, array_spec, sbatch_header, submit, written_concurrency

REPO_DIR = Path(__file__).resolve().parent
# The one copy of the presets (`--dry-run` prints their #SBATCH lines). Partition names change: check `sinfo -s`.
PRESETS: dict[str, dict[str, Any]] = {
    "hec": {"partition": "gpu-short", "gres": True},  # Lancaster HEC: or gpu-medium / gpu-long
    # Bede, as its documentation (N8-CIR-Bede/documentation, usage) shows: --account=<project> on every job,
    # partition gpu (4 V100 per node; "infer": 4 T4), --gres=gpu:N, and each GPU brings 25% of the node's CPUs and RAM.
    "bede": {"partition": "gpu", "gres": True, "mem": None, "needs_account": True},
}
DEFAULTS: dict[str, Any] = {"nodes": 1, "gpus_per_node": 1, "cpus_per_task": 4, "mem": "16G", "time": "08:00:00"}
SLURM_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}")  # sbatch --time's formats
RESOURCES = ["partition", "account", "nodes", "ntasks_per_node", "gpus_per_node", "cpus_per_task", "mem", "time"]


def load_sweep_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return sweep.SWEEP_CONFIG
    import yaml

    try:
        text = Path(path).read_text()
        try:  # JSON first: YAML 1.1 reads JSON's 1e-05 as the string "1e-05" (measured with PyYAML)
            config = json.loads(text)
        except ValueError:
            config = yaml.safe_load(text)
    except OSError as err:
        raise LaunchError(f"--sweep-config {path}: {err.strerror}; give a JSON or YAML file") from None
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())[:160]
        raise LaunchError(f"--sweep-config {path} is neither JSON nor YAML ({reason})") from None
    if not isinstance(config, dict):
        raise LaunchError(f"--sweep-config {path} holds a {type(config).__name__}, not a mapping like SWEEP_CONFIG")
    return config


def enumerate_rows(config: dict[str, Any], sample: int | None,
                   seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The config checked and filled with wandb's defaults (sweep.validate: it parses every value as train.py would,
    the slow part, done once), and its grid or `sample` seeded random draws."""
    try:
        validated = dict(sweep.validate(config))
        rows = sweep.random_configs(sample, seed, config) if sample else sweep.grid_configs(config)
    except sweep.SweepConfigError as err:
        raise LaunchError("the sweep config is invalid: " + "; ".join(str(err).splitlines())) from None
    if not rows:
        raise LaunchError("the sweep has no runs (a continuous parameter has no grid: use --sample N)")
    return validated, rows


def _device_count(devices: Any, gpus: int) -> int | None:
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


def _parse(argv: list[str], index: int) -> Any:
    try:
        return sweep.train_config(argv)  # loads torch: only here, so --help and --resume need not wait for it
    except Exception as err:  # jsonargparse's ArgumentError, or a constructor's ValueError/TypeError
        raise LaunchError(f"row {index} ({shlex.join(argv)}): train.py rejects it: {one_line(err)}") from None


def check_rows(rows: list[dict[str, Any]], extra: list[str], res: dict[str, Any]) -> None:
    """Parse the rows with their appended arguments as train.py would, and check that each run's devices and
    nodes match the job's tasks (Lightning needs one srun task per device; a mismatch fails late or hangs).
    Keys only depend on the keys of their own group (optimizer.lr on --optimizer=SGD: a class and its arguments),
    so each parse takes the next distinct values of every group: 1,000 rows of 10x10x10 values take 10 parses,
    the first being row 0. When one fails, its groups are parsed alone to name the row."""
    groups: dict[str, dict[tuple[tuple[str, Any], ...], int]] = {}  # group -> its distinct values -> first row
    for index, row in enumerate(rows):
        for key in sorted(row):
            prefix = key.split(".")[0]
            items = tuple(sorted((k, v) for k, v in row.items() if k.split(".")[0] == prefix))
            groups.setdefault(prefix, {}).setdefault(items, index)
    tables = [list(values.items()) for values in groups.values()]
    tasks, gpus, nodes = res["ntasks_per_node"], res["gpus_per_node"], res["nodes"]
    for j in range(max(len(table) for table in tables)):
        picked = [table[j % len(table)] for table in tables]
        argv = sweep.to_argv({k: v for items, _ in picked for k, v in items}) + extra
        try:
            config = _parse(argv, picked[0][1])
        except LaunchError:
            for items, index in picked:
                _parse(sweep.to_argv(dict(items)) + extra, index)
            raise
        if config.trainer.num_nodes != nodes:  # each node would train alone, or the job hang at its first collective
            raise LaunchError(f"row {picked[0][1]}: --nodes={nodes} but the Trainer runs --trainer.num_nodes="
                              f"{config.trainer.num_nodes}: append -- --trainer.num_nodes={nodes}")
        count = _device_count(config.trainer.devices, gpus)
        if count is not None and (problem := tasks_devices_mismatch(tasks * nodes, count, config.trainer.num_nodes)):
            raise LaunchError(f"row {picked[0][1]}: {problem} (here: --ntasks-per-node, --nodes, or -- --trainer.*)")


def resources(args: argparse.Namespace) -> dict[str, Any]:
    """The job's resources: defaults, then the preset, then the options given; refuses inconsistent ones."""
    preset = PRESETS.get(args.preset or "", {})
    res = {**DEFAULTS, **{k: v for k, v in preset.items() if k in RESOURCES}}
    res.update({k: getattr(args, k) for k in RESOURCES if getattr(args, k) is not None})
    if preset.get("needs_account") and not res.get("account"):
        raise LaunchError(f"--preset {args.preset} needs --account (every job there names its project)")
    if res.get("ntasks_per_node") is None:
        res["ntasks_per_node"] = res["gpus_per_node"] or 1  # one srun task per GPU, what Lightning expects
    res["gres"] = bool(preset.get("gres"))
    return res


def render_script(grid_dir: Path, n: int, k: int, res: dict[str, Any], name: str) -> str:
    """The batch script: #SBATCH header from the resources, then the array task: read its row, run it, mark it."""
    header = sbatch_header(name, f"0-{n - 1}%{k}", f"{n} rows, at most {k} at a time", res, f"{grid_dir}/row-%a.out")
    q = shlex.quote
    return f"""#!/usr/bin/env bash
# Grid of {n} train.py runs, one array task per row of grid.json; written by slurm_train.py, which submitted it.
#   python slurm_train.py --resume {q(str(grid_dir))}   # resubmit the rows without a row-<i>/done marker
#   squeue -r -j <job id>;  tail -f {q(str(grid_dir))}/row-0.out
{chr(10).join(header)}
set -euo pipefail
grid_dir={q(str(grid_dir))}
python={q(sys.executable)}  # the interpreter that checked the grid (jobs inherit the submitting shell's environment)
row=${{GRID_ROW:-${{SLURM_ARRAY_TASK_ID:?submit with sbatch, or run: python slurm_train.py --local}}}}
row_dir=$grid_dir/row-$row
die() {{ echo "job.sbatch, row $row: $*" >&2; exit 1; }}
if [ -e "$row_dir/done" ]; then echo "row $row already finished ($row_dir/done)"; exit 0; fi
argv=$("$python" -c 'import json, sys; row = json.load(open(sys.argv[1]))["rows"][int(sys.argv[2])]
print("\\n".join(row["argv"]))' "$grid_dir/grid.json" "$row") || die "cannot read row $row of $grid_dir/grid.json"
mapfile -t args <<< "$argv"
# A requeued or resumed row continues from its own checkpoints: Lightning's hpc_ckpt_N, else its last.ckpt.
resume=()
if [ -f "$row_dir/checkpoints/last.ckpt" ] && ! compgen -G "$row_dir/hpc_ckpt_*.ckpt" > /dev/null; then
  resume=(--ckpt_path=last)
fi
launch=()
if [ -n "${{SLURM_JOB_ID:-}}" ]; then
  tasks=${{SLURM_NTASKS_PER_NODE:-1}}  # train.py checks on every task that they match the Trainer's devices
  # Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch.
  if [ -n "${{SLURM_CPUS_PER_TASK:-}}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
  launch=(srun --ntasks-per-node="$tasks" --kill-on-bad-exit=1)
fi
start=$(date +%s.%N)
echo "row $row on $(hostname), CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-}}: train.py ${{args[*]}}"
"${{launch[@]}}" "$python" {q(str(REPO_DIR / "train.py"))} "${{resume[@]}}" "${{args[@]}}" --run_dir="$row_dir"
# Only reached when train.py exited 0 (set -e): a crashed or killed row is never marked finished.
mkdir -p "$row_dir"
printf '{{"row": %s, "job": "%s", "host": "%s", "start": %s, "end": %s}}\\n' "$row" \\
  "${{SLURM_ARRAY_JOB_ID:-local}}_${{SLURM_ARRAY_TASK_ID:-$row}}" "$(hostname)" "$start" "$(date +%s.%N)" \\
  > "$row_dir/.done.$$"
mv "$row_dir/.done.$$" "$row_dir/done"
"""


def unfinished(grid_dir: Path) -> list[int]:
    rows = json.loads((grid_dir / "grid.json").read_text())["rows"]
    return [i for i in range(len(rows)) if not (grid_dir / f"row-{i}" / "done").exists()]


def new_grid_dir(root: Path) -> Path:
    return root / timestamped_name("grid-")


def start_search(args: argparse.Namespace, extra: list[str]) -> tuple[Path, list[int]]:
    """Checks the sweep (a sample of its space with the appended arguments, as train.py would), then creates the
    search directory and its K-worker script; returns it and the workers' indices (none for --dry-run)."""
    if problem := extra_problem(extra):
        raise LaunchError(problem)
    config, k = load_sweep_config(args.sweep_config), args.max_concurrent
    grid = config.get("method") == "grid"
    res = resources(args)
    sweep_config, rows = enumerate_rows(config, None if grid else min(args.count, 50), args.seed)
    check_rows(rows, extra, res)  # a sample of the space, with the arguments after --
    search_dir = Path(args.runs_dir).resolve() / timestamped_name("search-")
    if not args.local and any(c.isspace() or c == "%" for c in str(search_dir)):  # #SBATCH --output cannot quote
        raise LaunchError(f"{search_dir}: a path with spaces or % cannot be a Slurm log path; use --runs-dir")
    header = sbatch_header(args.job_name or "search", f"0-{k - 1}", f"{k} workers, one per array task", res,
                           f"{search_dir}/worker-%a.out")
    script = render_search_script(search_dir, header)
    metric = sweep_config["metric"]
    stopping = "hyperband stopping" if "early_terminate" in sweep_config else "no early stopping"
    summary = (f"{config.get('method')} search of {args.count} runs by {k} workers, {metric['goal']} {metric['name']}, "
               f"{stopping}; each run: train.py <proposed settings> {shlex.join(extra)}")
    if args.dry_run:
        print(f"{script}\n# {summary}\n# dry run: nothing written or submitted; the search directory would be "
              f"{search_dir}")
        return search_dir, []
    if not args.local and shutil.which("sbatch") is None:
        raise LaunchError("sbatch not found: no Slurm here; run the workers on this machine with --local")
    new_search(search_dir, sweep_config, args.count, args.seed, extra, args.heartbeat_timeout)
    write_atomic(search_dir / "job.sbatch", script)
    print(summary)
    return search_dir, list(range(k))


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description="Run the sweep's configs as one Slurm job array (see the docstring).",
                                usage="python slurm_train.py [options] [-- train.py arguments for every row]")
    p.add_argument("--sample", type=int, help="this many seeded random draws instead of the grid")
    p.add_argument("--seed", type=int, default=0, help="seed of the --sample draws or of the --search engine")
    p.add_argument("--search", action="store_true", help="the sweep's own method (bayes, hyperband stopping) run by "
                   "--max-concurrent workers that propose --count runs from the runs' records, without wandb's server")
    p.add_argument("--count", type=int, help="with --search: how many runs in all")
    p.add_argument("--heartbeat-timeout", type=float, default=600.0,
                   help="with --search: seconds without a heartbeat after which a run on an unreachable node counts as "
                        "crashed (default 600)")
    p.add_argument("--sweep-config", help="JSON/YAML file with a sweep config (default: sweep.SWEEP_CONFIG)")
    p.add_argument("--max-concurrent", type=int, help="array tasks (or --local processes) at once (default 4; with "
                   "--resume, the directory's own)")
    p.add_argument("--dry-run", action="store_true", help="check, print the script and the runs; write nothing")
    p.add_argument("--local", action="store_true", help="no Slurm: run the rows as processes on this machine")
    p.add_argument("--resume", metavar="RUN_DIR", help="resubmit only the rows of RUN_DIR that did not finish")
    p.add_argument("--runs-dir", default="runs", help="where the grid directory is made (default: runs)")
    p.add_argument("--job-name", help="default: grid, or search with --search")
    p.add_argument("--preset", choices=sorted(PRESETS), help="cluster defaults (partition names: check them)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", help=f"time limit per row (default {DEFAULTS['time']})")
    p.add_argument("--nodes", type=int, help="nodes per row (default 1; append -- --trainer.num_nodes=N)")
    p.add_argument("--gpus-per-node", type=int, help=f"default {DEFAULTS['gpus_per_node']}; 0: CPU only")
    p.add_argument("--ntasks-per-node", type=int, help="default: the GPUs per node (one task per device)")
    p.add_argument("--cpus-per-task", type=int, help=f"default {DEFAULTS['cpus_per_task']}")
    p.add_argument("--mem", help=f"memory per node (default {DEFAULTS['mem']})")
    args = p.parse_args(own)
    if args.max_concurrent is None and not args.resume:
        args.max_concurrent = 4
    if args.search != (args.count is not None) or (args.search and args.sample is not None):
        p.error("--search needs --count N (how many runs in all), and --count and --sample fit only one of them: "
                "--search --count N (adaptive), or --sample N (random draws, no search)")
    for option in ("max_concurrent", "count", "sample", "nodes", "gpus_per_node", "ntasks_per_node", "cpus_per_task"):
        lowest = 0 if option == "gpus_per_node" else 1
        if getattr(args, option) is not None and getattr(args, option) < lowest:
            p.error(f"--{option.replace('_', '-')} must be at least {lowest}, got {getattr(args, option)}")
    if args.time is not None and not SLURM_TIME.fullmatch(args.time):
        p.error(f"--time {args.time!r} is not a Slurm time: use MM, HH:MM:SS, D-HH or D-HH:MM:SS (e.g. 08:00:00)")
    runs_dir = Path(args.runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        p.error(f"--runs-dir {args.runs_dir} is a file; give a directory (it is created if missing)")
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in [*RESOURCES, "sample", "count", "sweep_config", "preset"]
                 if getattr(args, k) is not None]
        if given or extra:
            p.error(f"--resume reruns the grid as it was written: drop {' '.join(given) or '--'} "
                    f"(edit {args.resume}/job.sbatch to change its resources)")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    k = args.max_concurrent
    created: Path | None = None  # a grid directory made by this call: removed again if submitting fails
    try:
        if args.resume:
            grid_dir = Path(args.resume).resolve()
            k = k or written_concurrency(grid_dir / "job.sbatch") or 4  # the grid's throttle, the search's workers
            search = (grid_dir / SEARCH_FILE).is_file()
            if not (search or (grid_dir / "grid.json").is_file()) or not (grid_dir / "job.sbatch").is_file():
                raise LaunchError(f"{grid_dir} is neither a grid nor a search directory (no grid.json, search.json or "
                                  "job.sbatch)")
            indices = (list(range(k)) if unfinished_search(grid_dir) else []) if search else unfinished(grid_dir)
            if not indices:
                print(f"every {'run' if search else 'row'} of {grid_dir} has finished: nothing to resubmit")
                return 0
            if not args.local and (jobs := active_jobs(grid_dir)):
                raise LaunchError(f"job(s) {', '.join(jobs)} of this grid are still queued or running: wait for "
                                  f"them or scancel them first, else rows would run twice")
            print(f"{k} new worker(s) for the search" if search else
                  f"{len(indices)} unfinished row(s): --array={array_spec(indices, k)}")
            if args.dry_run:
                print((grid_dir / "job.sbatch").read_text())
                return 0
        elif search := args.search:
            grid_dir, indices = start_search(args, extra)
            if not indices:
                return 0  # a dry run
            created = grid_dir
        else:
            config = load_sweep_config(args.sweep_config)
            _, rows = enumerate_rows(config, args.sample, args.seed)
            res = resources(args)
            check_rows(rows, extra, res)  # before anything is written: a bad row fails here, not in the queue
            indices = list(range(len(rows)))
            grid_dir = new_grid_dir(Path(args.runs_dir).resolve())
            # #SBATCH --output cannot quote, and % is a pattern there; --local runs write no Slurm log
            if not args.local and any(c.isspace() or c == "%" for c in str(grid_dir)):
                raise LaunchError(f"{grid_dir}: a path with spaces or % cannot be a Slurm log path; use --runs-dir")
            script = render_script(grid_dir, len(rows), k, res, args.job_name or "grid")
            argvs = [sweep.to_argv(row) + extra for row in rows]
            if args.dry_run:
                print(script)
                print(f"# {len(rows)} runs (each with --run_dir={grid_dir}/row-<i>); dry run: nothing written or "
                      "submitted")
                print("\n".join(f"# row {i}: " + shlex.join(["python", "train.py", *a]) for i, a in enumerate(argvs)))
                return 0
            if not args.local and shutil.which("sbatch") is None:
                raise LaunchError("sbatch not found: no Slurm here; run the rows on this machine with --local")
            grid_dir.mkdir(parents=True)
            created = grid_dir
            table = [{"row": i, "config": row, "argv": a} for i, (row, a) in enumerate(zip(rows, argvs, strict=True))]
            grid = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sweep": config.get("name"),
                    "sample": args.sample, "seed": args.seed, "extra": extra, "rows": table}
            write_atomic(grid_dir / "grid.json", json.dumps(grid, indent=1) + "\n")
            write_atomic(grid_dir / "job.sbatch", script)
        what = f"{k} search worker(s)" if search else f"{len(indices)} row(s), at most {k} at a time"
        if args.local:
            from filelock import FileLock, Timeout

            lock = FileLock(str(grid_dir / ".local.lock"))  # released by the OS if this process dies
            try:
                lock.acquire(timeout=0)
            except Timeout:
                raise LaunchError(f"{grid_dir} is already running on this machine (another slurm_train.py --local): "
                                  "wait for it to end, else its runs would run twice") from None
            with lock:
                if args.resume:
                    if problem := stop_orphans(grid_dir):  # runs an earlier launcher left: saved, stopped, resumed
                        raise LaunchError(problem)
                print(f"run directory: {grid_dir}\nrunning {what} here")
                return run_local(grid_dir, indices, k, "worker" if search else "row")
        if shutil.which("sbatch") is None:
            raise LaunchError("sbatch not found: no Slurm here; run the rows on this machine with --local")
        job = submit(grid_dir, indices, k)
    except LaunchError as err:
        if created is not None and not args.local:
            shutil.rmtree(created, ignore_errors=True)  # nothing was submitted: leave no grid that looks queued
        print(f"error: {err}", file=sys.stderr)
        return 1
    log = grid_dir / (f"worker-{indices[0]}.out" if search else f"row-{indices[0]}.out")
    print(f"submitted job {job}: {what}\nrun directory: {grid_dir}\n"
          f"watch:  squeue -r -j {job}      logs:  tail -f {log}\n"
          + (f"progress:  python sweep.py --status {grid_dir}" if search else
             f"resume the rows that did not finish:  python slurm_train.py --resume {grid_dir}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
