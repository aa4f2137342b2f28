"""The batch scripts slurm_train.py writes: a grid's (one train.py row per array task) and wandb sweep agents' (one
agent per task, running sbatch_agent.sh). Each is the cluster's #SBATCH header (support/clusters/plan.py), how to
submit it again, the cluster's set-up lines and $python, the environment of the architecture the task runs on.
The offline search's is support/search_launch.py's. Light on purpose (no torch)."""

from __future__ import annotations

import shlex
from pathlib import Path

from support.clusters.plan import JobPlan, job_start
from support.slurm_jobs import sbatch_header

REPO_DIR = Path(__file__).resolve().parent.parent


def script_head(plan: JobPlan, header: list[str], local: bool) -> str:
    """The #SBATCH header, how to submit the script again, then the cluster's set-up and the job's $python."""
    how = f"# submit with: {plan.submit}" + (f" (sbatch on {plan.partition.arch})" if plan.submit != "sbatch" else "")
    return "\n".join(header) + f"\n{how}\n{job_start(plan, local)}"


def render_script(grid_dir: Path, n: int, k: int, plan: JobPlan, name: str, local: bool = False) -> str:
    """The batch script: #SBATCH header from the resources, then the array task: read its row, run it, mark it."""
    header = sbatch_header(name, f"0-{n - 1}%{k}", f"{n} rows, at most {k} at a time", plan.res,
                           f"{grid_dir}/row-%a.out")
    q = shlex.quote
    return f"""#!/usr/bin/env bash
# Grid of {n} train.py runs, one array task per row of grid.json; written by slurm_train.py, which submitted it.
#   python slurm_train.py --resume {q(str(grid_dir))}   # resubmit the rows without a row-<i>/done marker
#   squeue -r -j <job id>;  tail -f {q(str(grid_dir))}/row-0.out
{script_head(plan, header, local)}
grid_dir={q(str(grid_dir))}
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
echo "row $row on $(hostname) ($arch, $python), CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-}}: train.py ${{args[*]}}"
"${{launch[@]}}" "$python" {q(str(REPO_DIR / "train.py"))} "${{resume[@]}}" "${{args[@]}}" --run_dir="$row_dir"
# Only reached when train.py exited 0 (set -e): a crashed or killed row is never marked finished.
mkdir -p "$row_dir"
printf '{{"row": %s, "job": "%s", "host": "%s", "start": %s, "end": %s}}\\n' "$row" \\
  "${{SLURM_ARRAY_JOB_ID:-local}}_${{SLURM_ARRAY_TASK_ID:-$row}}" "$(hostname)" "$start" "$(date +%s.%N)" \\
  > "$row_dir/.done.$$"
mv "$row_dir/.done.$$" "$row_dir/done"
"""


def render_agents_script(agents_dir: Path, sweep_id: str, count: int, k: int, plan: JobPlan, name: str) -> str:
    """wandb sweep agents as one array, one agent (one run) per task: this cluster's header and set-up, then
    sbatch_agent.sh (the one copy of what an agent's task does) in the environment of the node's architecture."""
    header = sbatch_header(name, f"0-{count - 1}%{k}", f"{count} agents, at most {k} at a time", plan.res,
                           f"{agents_dir}/agent-%a.out")
    q = shlex.quote
    return f"""#!/usr/bin/env bash
# wandb sweep agents for {sweep_id}, one run each; written by slurm_train.py --agents, which submitted it.
{script_head(plan, header, local=False)}
cd {q(str(REPO_DIR))}
export PATH="$(dirname "$python"):$PATH"  # sbatch_agent.sh runs the `python` and `wandb` it finds first
exec bash {q(str(REPO_DIR / "sbatch_agent.sh"))} {q(sweep_id)} 1
"""
