"""Run a sweep's configs offline as ONE Slurm job array: one array task per config, one train.py run each.

    python slurm_train.py --dry-run                          # check the grid, print the sbatch script and the runs
    python slurm_train.py                                    # the grid of sweep.py's SWEEP_CONFIG, 4 rows at a time
    python slurm_train.py --sample 20 --seed 0               # 20 seeded random draws instead of the grid
    python slurm_train.py --max-concurrent 8 --time 02:00:00 --gpus-per-node 2 -- --trainer.max_epochs=5
    python slurm_train.py --cluster bede --account myproject # a cluster of clusters.toml: hec, bede, generic
    python slurm_train.py --clusters                         # their partitions, limits and GPUs
    python slurm_train.py --agents ENTITY/PROJECT/SWEEP_ID --count 20   # wandb sweep agents (sbatch_agent.sh)
    python slurm_train.py --runs-per-gpu 4                   # 4 rows at once in each array task, on one GPU
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
Every row is checked as train.py would check it (constructors included), and the job against the cluster's limits
(clusters.toml: time, GPUs, account, GPU type, array size, the torch of the environment for the partition's
architecture), before anything is written or submitted; --dry-run shows any partition's script from any machine (what
a submission would lack is a note), and --local rows follow no cluster's queue rules.
A search (--search) writes search.json, job.sbatch (K workers, support/search/worker.py), worker-<i>.out, and per run
run-NNNN.json (its record), run-NNNN.out and run-NNNN/; see docs/sweeps.md, "Offline search". With --runs-per-gpu K each
array task runs K rows (or workers) at once and logs to task-<t>.out (support/slurm/packing.py; docs/slurm.md,
"Packing several small runs on one GPU").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import sweep
from support.atomic import write_atomic
from support.clusters.environments import machine_arch
from support.clusters.plan import (
    RESOURCES,
    JobPlan,
    job_account,
    local_plan,
    missing_submit_command,
    plan_job,
    script_values_problem,
    storage_notes,
)
from support.clusters.profiles import load_clusters, partition_table
from support.errors import LaunchError, one_line
from support.provenance.snapshot import STORE, Snapshot, discard, freeze, summary
from support.run_dir.checks import tasks_devices_mismatch, timestamped_name
from support.search.launch import (
    extra_problem,
    new_search,
    render_search_script,
    search_settings,
    unfinished_search,
)
from support.search.records import SEARCH_FILE
from support.slurm.array_limit import array_problem
from support.slurm.grid_rows import device_count, given_keys, value_groups, without_given
from support.slurm.jobs import (
    active_jobs,
    array_spec,
    check_sbatch_values,
    control_character_problem,
    log_path_problem,
    sbatch_header,
    submit,
    unwritable,
    written_concurrency,
)
from support.slurm.local_rows import LOCAL_LOCK, run_local, running_locally, stop_orphans
from support.slurm.options import parse_args
from support.slurm.packing import task_count, tasks_of
from support.slurm.resume import load_grid, relocate, unfinished
from support.slurm.scripts import render_agents_script, render_script, resumed_code, script_head

REPO_DIR = Path(__file__).resolve().parent


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


def _parse(argv: list[str], index: int) -> Any:
    try:
        return sweep.train_config(argv)  # loads torch: only here, so --help and --resume need not wait for it
    except Exception as err:  # jsonargparse's ArgumentError, or a constructor's ValueError/TypeError
        raise LaunchError(f"row {index} ({shlex.join(argv)}): train.py rejects it: {one_line(err)}") from None


def check_rows(rows: list[dict[str, Any]], extra: list[str], res: dict[str, Any]) -> None:
    """Parse the rows with their appended arguments as train.py would, and check that each run's devices and
    nodes match the job's tasks (Lightning needs one srun task per device; a mismatch fails late or hangs).
    Each parse takes the next distinct value of every key: 1,600 rows of model.* values 10x10x4x4 take 10 parses,
    the first being row 0 (grouped by their first word, as before, they took 1,600: 3 min 54 s, issue 35). A key
    below a class the sweep chooses (optimizer.lr under optimizer={"class_path": ...}) means something only with
    that class, so it goes with it. When a parse fails, its groups are parsed alone to name the row."""
    groups = value_groups(rows)
    # Rows with no key of their own (every one given after --) still get one parse.
    tables = [list(values.values()) for values in groups.values()] or [[((), 0)]]
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
        count = device_count(config.trainer.devices, gpus)
        if count is not None and (problem := tasks_devices_mismatch(tasks * nodes, count, config.trainer.num_nodes)):
            raise LaunchError(f"row {picked[0][1]}: {problem} (here: --ntasks-per-node, --nodes, or -- --trainer.*)")


def job_plan(args: argparse.Namespace) -> JobPlan:
    """The job's resources on the chosen cluster (clusters.toml), checked against its limits."""
    clusters = load_clusters()
    cluster = clusters.get(args.cluster or clusters.default_cluster)
    given = {k: getattr(args, k) for k in RESOURCES}
    if args.local:  # this machine: no queue rule of any cluster, no account, nothing about the cluster's storage
        plan = local_plan(cluster, given)
    else:
        given["account"], notes = job_account(clusters, cluster, args.account)
        plan = plan_job(cluster, given, preview=args.dry_run)
        plan.notes += notes + storage_notes(plan, Path(args.runs_dir), Path(sys.prefix))
    check_sbatch_values(plan.res, args.job_name)  # before the rows' checks (seconds): every value of the header
    if problem := script_values_problem(plan):  # and clusters.toml's lines and names the script holds
        raise LaunchError(problem)
    plan.local_data = not args.no_local_data
    return plan


def runs_per_gpu(job_dir: Path) -> int:
    """How many runs a grid's or search's array task runs at once (written before packing: 1)."""
    return (search_settings(job_dir) if (job_dir / SEARCH_FILE).is_file() else load_grid(job_dir))["runs_per_gpu"]


def new_grid_dir(root: Path) -> Path:
    return root / timestamped_name("grid-")


def remove_made(args: argparse.Namespace) -> None:
    """What a launch that failed while writing made: its new directory, its frozen code, and the code store and the
    runs directory when they were new and are empty now (a full disk left an empty grid-* per try)."""
    discard(getattr(args, "frozen", None))
    made = getattr(args, "made", None)
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
    for folder in (Path(args.runs_dir) / STORE, Path(args.runs_dir)):
        if folder not in args.existed:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty


def new_run_dir(args: argparse.Namespace, prefix: str) -> Path:
    args.existed = {folder for folder in (Path(args.runs_dir) / STORE, Path(args.runs_dir)) if folder.exists()}
    run_dir = args.made = Path(args.runs_dir).resolve() / timestamped_name(prefix)
    # The job script names its directory in comments, where a quoted newline would end the comment, and Slurm's
    # #SBATCH --output cannot quote whitespace or % at all.
    if problem := log_path_problem(str(run_dir)) if not args.local else control_character_problem(str(run_dir)):
        raise LaunchError(problem)
    return run_dir


def frozen_code(args: argparse.Namespace) -> Snapshot:
    """The frozen copy of this project's code that the job runs (for --dry-run: checked, and where it would go)."""
    snapshot = args.frozen = freeze(REPO_DIR, Path(args.runs_dir), dry_run=args.dry_run)  # main discards it on failure
    print(summary(snapshot) if not args.dry_run else f"# code: would be frozen into {snapshot.dir} "
          f"({snapshot.files} files, {snapshot.bytes / 2**20:.1f} MB)", file=sys.stderr)
    return snapshot


def start_search(args: argparse.Namespace, extra: list[str], plan: JobPlan) -> tuple[Path, list[int]]:
    """Checks the sweep (a sample of its space with the appended arguments, as train.py would), then creates the
    search directory and its K-worker script; returns it and the workers' indices (none for --dry-run)."""
    if problem := extra_problem(extra):
        raise LaunchError(problem)
    config, k = load_sweep_config(args.sweep_config), args.max_concurrent
    if k * args.runs_per_gpu > args.count:  # 12 workers started for a 2-run search: 10 ended at once, on a GPU each
        k = args.max_concurrent = -(-args.count // args.runs_per_gpu)
        print(f"note: {k} array task(s) of {args.runs_per_gpu} worker(s): no more than the {args.count} runs",
              file=sys.stderr)
    grid = config.get("method") == "grid"
    sweep_config, rows = enumerate_rows(config, None if grid else min(args.count, 50), args.seed)
    check_rows(rows, extra, plan.res)  # a sample of the space, with the arguments after --
    search_dir, per_gpu = new_run_dir(args, "search-"), args.runs_per_gpu
    header = sbatch_header(args.job_name or "search", f"0-{k - 1}", f"{k * per_gpu} workers, {per_gpu} per array task",
                           plan.res, f"{search_dir}/{'worker' if per_gpu == 1 else 'task'}-%a.out")
    script = render_search_script(search_dir, script_head(plan, header, args.local), frozen_code(args).dir, per_gpu)
    metric = sweep_config["metric"]
    stopping = "hyperband stopping" if "early_terminate" in sweep_config else "no early stopping"
    packing = f" ({per_gpu} per GPU, in {k} array tasks)" if per_gpu > 1 else ""
    summary = (f"{config.get('method')} search of {args.count} runs by {k * per_gpu} workers{packing}, "
               f"{metric['goal']} {metric['name']}, {stopping}; each run: train.py <proposed settings> "
               f"{shlex.join(extra)}")
    if args.dry_run:
        print(f"{script}\n# {summary}\n# dry run: nothing written or submitted; the search directory would be "
              f"{search_dir}")
        return search_dir, []
    new_search(search_dir, sweep_config, args.count, args.seed, extra, args.heartbeat_timeout, runs_per_gpu=per_gpu)
    write_atomic(search_dir / "job.sbatch", script)
    print(summary)
    return search_dir, list(range(k))


def start_grid(args: argparse.Namespace, extra: list[str], plan: JobPlan) -> tuple[Path, list[int]]:
    """Checks every row, then writes the grid directory (grid.json, job.sbatch); returns it and its rows' indices
    (none for --dry-run, which prints the script and the rows instead)."""
    config = load_sweep_config(args.sweep_config)
    _, rows = enumerate_rows(config, args.sample, args.seed)
    if replaced := sorted({key for row in rows for key in row} & given_keys(extra)):
        print(f"note: the arguments after -- set {', '.join(replaced)}: that value replaces the sweep's in every row")
    rows = [without_given(row, extra) for row in rows]
    refuse_large_array(args, task_count(len(rows), args.runs_per_gpu), len(rows), plan)
    check_rows(rows, extra, plan.res)  # before anything is written: a bad row fails here, not in the queue
    grid_dir, per_gpu = new_run_dir(args, "grid-"), args.runs_per_gpu
    code = frozen_code(args).dir
    script = render_script(grid_dir, len(rows), args.max_concurrent, plan, args.job_name or "grid", code, args.local,
                           per_gpu)
    argvs = [sweep.to_argv(row) + extra for row in rows]
    tasks = task_count(len(rows), per_gpu)
    if args.dry_run:
        print(script)
        shared = "per GPU" if plan.res["gpus_per_node"] else "sharing the CPUs"  # --gpus-per-node 0: no GPU
        packing = (f", {per_gpu} {shared} at once: {tasks} array tasks, task t running rows t*{per_gpu} to "
                   f"t*{per_gpu}+{per_gpu - 1}" if per_gpu > 1 else "")
        print(f"# {len(rows)} runs (each with --run_dir={grid_dir}/row-<i>){packing}; dry run: nothing written or "
              "submitted")
        print("\n".join(f"# row {i}: " + shlex.join(["python", "train.py", *a]) for i, a in enumerate(argvs)))
        return grid_dir, []
    grid_dir.mkdir(parents=True)
    table = [{"row": i, "config": row, "argv": a} for i, (row, a) in enumerate(zip(rows, argvs, strict=True))]
    grid = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sweep": config.get("name"), "sample": args.sample,
            "seed": args.seed, "extra": extra, "runs_per_gpu": per_gpu, "rows": table}
    write_atomic(grid_dir / "grid.json", json.dumps(grid, indent=1) + "\n")
    write_atomic(grid_dir / "job.sbatch", script)
    return grid_dir, list(range(tasks))


def refuse_large_array(args: argparse.Namespace, tasks: int, rows: int, plan: JobPlan) -> None:
    """A job array over the cluster's MaxArraySize is refused before anything is written (--local has no array)."""
    if not args.local and (problem := array_problem(plan, tasks, rows, args.runs_per_gpu)):
        raise LaunchError(problem)


def start_agents(args: argparse.Namespace, plan: JobPlan) -> tuple[Path, list[int]]:
    refuse_large_array(args, args.count, args.count, plan)
    agents_dir = new_run_dir(args, "agents-")
    script = render_agents_script(agents_dir, args.agents, args.count, args.max_concurrent, plan,
                                  args.job_name or "sweep-agent", frozen_code(args).dir)
    if args.dry_run:
        print(f"{script}\n# dry run: nothing written or submitted; the agents' directory would be {agents_dir}")
        return agents_dir, []
    agents_dir.mkdir(parents=True)
    write_atomic(agents_dir / "job.sbatch", script)
    return agents_dir, list(range(args.count))


def resubmit_command(job_dir: Path) -> str:
    """How job.sbatch was submitted (its `# submit with:` line): ghbatch stays ghbatch unless this machine is of
    the architecture it names, where sbatch works."""
    words = next((line.split()[3:] for line in (job_dir / "job.sbatch").read_text().splitlines()
                  if line.startswith("# submit with: ")), ["sbatch"])
    return "sbatch" if len(words) > 3 and words[3].rstrip(")") == machine_arch() else words[0]


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    k = args.max_concurrent
    created: Path | None = None  # a directory made by this call: removed again if submitting fails
    search = False
    try:
        if args.clusters:
            print(partition_table(load_clusters()))
            return 0
        if args.resume:
            grid_dir = Path(args.resume).resolve()
            k = k or written_concurrency(grid_dir / "job.sbatch") or 4  # the grid's throttle, the search's workers
            search = (grid_dir / SEARCH_FILE).is_file()
            if not (search or (grid_dir / "grid.json").is_file()) or not (grid_dir / "job.sbatch").is_file():
                raise LaunchError(f"{grid_dir} is neither a grid nor a search directory (no grid.json, search.json or "
                                  "job.sbatch)")
            per_gpu, rows = runs_per_gpu(grid_dir), [] if search else unfinished(grid_dir)
            indices = (list(range(k)) if unfinished_search(grid_dir) else []) if search else tasks_of(rows, per_gpu)
            if not indices:
                print(f"every {'run' if search else 'row'} of {grid_dir} has finished: nothing to resubmit")
                return 0
            if not args.local and running_locally(grid_dir):
                raise LaunchError(f"{grid_dir} is running on this machine (slurm_train.py --local): wait for it or "
                                  "stop it first, else its rows would run twice")
            if not args.local and (jobs := active_jobs(grid_dir)):
                raise LaunchError(f"job(s) {', '.join(jobs)} of this grid are still queued or running: wait for "
                                  f"them or scancel them first, else rows would run twice")
            relocate(grid_dir, args.local, args.dry_run)  # a moved or copied directory resumes where it is
            print(f"{k * per_gpu} new worker(s) for the search" if search else
                  f"{len(rows)} unfinished row(s){f' in {len(indices)} task(s)' if per_gpu > 1 else ''}: "
                  f"--array={array_spec(indices, k)}")
            resumed_code(grid_dir, REPO_DIR, Path(args.runs_dir), args.current_code, args.dry_run)
            if args.dry_run:
                print((grid_dir / "job.sbatch").read_text())
                return 0
            command = resubmit_command(grid_dir)
        else:
            plan = job_plan(args)
            command, search, per_gpu = plan.submit, args.search, args.runs_per_gpu
            if not (args.local or args.dry_run) and shutil.which(command) is None:
                raise LaunchError(missing_submit_command(plan))
            try:
                start = start_agents(args, plan) if args.agents else \
                    start_search(args, extra, plan) if search else start_grid(args, extra, plan)
            except OSError as err:  # the runs directory is read-only or full: one line, nothing left behind
                remove_made(args)
                raise LaunchError(unwritable(Path(args.runs_dir), err)) from None
            grid_dir, indices = start
            print("\n".join(plan.notes), file=sys.stderr, end="\n" if plan.notes else "")  # once the checks passed
            if not indices:
                return 0  # a dry run
            created = grid_dir
        label = "agent" if args.agents else "task" if per_gpu > 1 else "worker" if search else "row"
        what = (f"{k * per_gpu} search worker(s)" if search else f"{len(indices)} {label}(s), at most {k} at a time") \
            + (f", {per_gpu} runs at once in each task (--runs-per-gpu)" if per_gpu > 1 else "")
        if args.local:
            from filelock import FileLock, Timeout

            lock = FileLock(str(grid_dir / LOCAL_LOCK))  # released by the OS if this process dies
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
                return run_local(grid_dir, indices, k, label)
        if shutil.which(command) is None:
            raise LaunchError(f"{command} not found: no Slurm here; run the rows on this machine with --local")
        job = submit(grid_dir, indices, k, command)
    except LaunchError as err:
        if created is not None and not args.local:
            shutil.rmtree(created, ignore_errors=True)  # nothing was submitted: leave no grid that looks queued
            discard(getattr(args, "frozen", None))
        print(f"error: {err}", file=sys.stderr)
        return 1
    resume = "" if search or args.agents else f"      resume:  python slurm_train.py --resume {grid_dir}"
    follow = f"results:  python sweep.py --status {grid_dir}{resume}"
    print(f"submitted job {job} with {command}: {what}\nrun directory: {grid_dir}\n"
          f"watch:  squeue -r -j {job}      logs:  tail -f {grid_dir / f'{label}-{indices[0]}.out'}\n{follow}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
