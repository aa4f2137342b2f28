"""slurm_train.py's options, checked: each mistake is argparse's one-line error naming the option and the fix.
Light on purpose (no torch): --help and the checks answer at once."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from support.clusters.plan import RESOURCES, TEMPLATE_TIME
from support.clusters.profiles import time_seconds


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
    p.add_argument("--current-code", action="store_true", help="with --resume: run the project's code as it is now "
                   "(after listing what differs), not the frozen copy the job was submitted with")
    p.add_argument("--runs-dir", default="runs", help="where the grid directory is made (default: runs)")
    p.add_argument("--job-name", help="default: grid, or search with --search")
    p.add_argument("--agents", metavar="SWEEP_ID", help="wandb sweep agents for ENTITY/PROJECT/SWEEP_ID instead: "
                   "--count agents (one run each), --max-concurrent at a time (sbatch_agent.sh, with this cluster's "
                   "header)")
    p.add_argument("--cluster", "--preset", help="a cluster of clusters.toml (hec, bede, generic; default: its "
                   "default_cluster): its partitions' limits and header")
    p.add_argument("--clusters", action="store_true", help="print the known clusters' partitions and exit")
    p.add_argument("--partition", help="default: the cluster's default partition")
    p.add_argument("--account", help="the project to charge (required on Bede; default: the cluster's own "
                   "default_account in clusters.toml)")
    p.add_argument("--time", help=f"time limit per row (default {TEMPLATE_TIME}, or the partition's maximum if less)")
    p.add_argument("--nodes", type=int, help="nodes per row (default 1; append -- --trainer.num_nodes=N)")
    p.add_argument("--gpus-per-node", type=int, help="default 1; 0: CPU only")
    p.add_argument("--gpu-type", help="a GPU type of the partition (its gres name: --clusters lists them)")
    p.add_argument("--ntasks-per-node", type=int, help="default: the GPUs per node (one task per device)")
    p.add_argument("--cpus-per-task", type=int, help="default: the cluster's (4), none where GPUs bring CPUs")
    p.add_argument("--mem", help="memory per node (default: the cluster's, 16G; none where GPUs bring memory)")
    p.add_argument("--runs-per-gpu", type=int, default=1, metavar="K",
                   help="K rows (or search workers) at once in each array task, sharing its GPU(s): ceil(rows / K) "
                        "tasks; --max-concurrent counts tasks (default 1; see docs/slurm.md)")
    p.add_argument("--no-local-data", action="store_true", help="read datasets from where they were prepared, not "
                   "from a copy on the node's local scratch (clusters.toml local_scratch)")
    args = p.parse_args(own)
    if args.max_concurrent is None and not args.resume:
        args.max_concurrent = 4
    if bool(args.search or args.agents) != (args.count is not None) or (args.count and args.sample is not None):
        p.error("--search needs --count N (how many runs in all; --agents too), and --count and --sample fit only "
                "one of them: --search --count N (adaptive), or --sample N (random draws, no search)")
    if args.agents and not re.fullmatch(r"[\w.-]+(/[\w.-]+){0,2}", args.agents):  # written into the job script
        p.error(f"--agents {args.agents!r} is not a sweep id: give ENTITY/PROJECT/SWEEP_ID as `wandb sweep` printed it")
    if args.agents and (args.search or args.local or args.resume or extra):
        p.error("--agents runs wandb agents on Slurm: drop --search, --local, --resume and -- (agents on this machine: "
                "./run_sweep.sh)")
    if args.runs_per_gpu > 1 and (args.agents or (args.nodes or 1) > 1):
        p.error("--runs-per-gpu packs grid rows and search workers of one node: drop it for --agents and --nodes > 1")
    for option in ("max_concurrent", "count", "sample", "nodes", "gpus_per_node", "ntasks_per_node", "cpus_per_task",
                   "runs_per_gpu"):
        lowest = 0 if option == "gpus_per_node" else 1
        if getattr(args, option) is not None and getattr(args, option) < lowest:
            p.error(f"--{option.replace('_', '-')} must be at least {lowest}, got {getattr(args, option)}")
    if args.time is not None and time_seconds(args.time) is None:
        p.error(f"--time {args.time!r} is not a Slurm time: use MM, HH:MM:SS, D-HH or D-HH:MM:SS (e.g. 08:00:00)")
    if args.time is not None and time_seconds(args.time) == 0:  # Slurm's "no limit": it passed the partition check
        p.error(f"--time {args.time} is Slurm's 'no limit', which no partition's maximum can be checked against: give "
                "a limit (e.g. 08:00:00)")
    runs_dir = Path(args.runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        p.error(f"--runs-dir {args.runs_dir} is a file; give a directory (it is created if missing)")
    if args.current_code and not args.resume:
        p.error("--current-code goes with --resume: a new submission always freezes the code as it is now")
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in [*RESOURCES, "sample", "count", "sweep_config", "cluster"]
                 if getattr(args, k) is not None] + (["--runs-per-gpu"] if args.runs_per_gpu != 1 else [])
        if given or extra:
            p.error(f"--resume reruns the grid as it was written: drop {' '.join(given) or '--'} "
                    f"(edit {args.resume}/job.sbatch to change its resources)")
    return args, extra
