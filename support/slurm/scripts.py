"""The batch scripts slurm_train.py writes: a grid's (one train.py row per array task) and wandb sweep agents' (one
agent per task, running sbatch_agent.sh). Each is the cluster's #SBATCH header (support/clusters/plan.py), how to
submit it again, the cluster's set-up lines and $python, the environment of the architecture the task runs on, and
`code=`, the frozen copy of the code submitted, which a resume keeps unless told to take the project's code now.
The offline search's is support/search/launch.py's. Light on purpose (no torch)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from support import REPO_DIR
from support.atomic import write_atomic
from support.clusters.plan import JobPlan, job_start
from support.errors import LaunchError
from support.provenance.snapshot import CODE_ENV, describe, differing_files, freeze, summary
from support.slurm.jobs import sbatch_header
from support.slurm.local_rows import LOCAL_TASK_ENV
from support.slurm.packing import RUNS_PER_GPU_ENV, task_count

CODE_LINE_NOTE = "the frozen copy of the submitted code"


def script_head(plan: JobPlan, header: list[str], local: bool) -> str:
    """The #SBATCH header, how to submit the script again, then the cluster's set-up and the job's $python."""
    arch = plan.partition.arch if plan.partition else ""
    how = f"# submit with: {plan.submit}" + (f" (sbatch on {arch})" if plan.submit != "sbatch" else "")
    return "\n".join(header) + f"\n{how}\n{job_start(plan, local)}"


def code_lines(code: Path) -> str:
    """Where the job's code is: the frozen copy made at submission (support/provenance/snapshot.py), which every
    task, requeue and resume runs; `slurm_train.py --resume --current-code` rewrites this line."""
    return (f"code={shlex.quote(str(code))}  # {CODE_LINE_NOTE}\n"
            f'export {CODE_ENV}="$code" PYTHONPATH="$code${{PYTHONPATH:+:$PYTHONPATH}}"\n')


def code_of_job(job_dir: Path) -> Path | None:
    """The frozen copy job.sbatch runs (its `code=` line), or None for a job written before v0.3.0 (which runs the
    project's working tree)."""
    for line in (job_dir / "job.sbatch").read_text().splitlines():
        if line.startswith("code=") and line.endswith(f"# {CODE_LINE_NOTE}"):
            return Path(shlex.split(line.removesuffix(f"# {CODE_LINE_NOTE}"))[0].removeprefix("code="))
    return None


def resumed_code(job_dir: Path, project: Path, runs_dir: Path, current: bool, dry_run: bool) -> None:
    """Which code the resubmitted tasks run, said in one line: the job's frozen copy (and what differs in the project
    now), or with `current` (--current-code) the project's code as it is, frozen anew and written into job.sbatch."""
    code = code_of_job(job_dir)
    if code is None:
        print(f"code: {job_dir.name} was written before the template froze code: its tasks run the project's code as "
              "it is now", file=sys.stderr)
        return
    changed = differing_files(code, project) if code.is_dir() else None
    if not current:
        if changed is None:
            raise LaunchError(f"the frozen code of {job_dir.name} ({code}) is gone: resume with --current-code to "
                              "run the project's code as it is now")
        print(f"code: the rows run the code they were submitted with ({code})" +
              (f"; the project's differs in {describe(changed)} (--current-code takes it)" if changed else ""),
              file=sys.stderr)
        return
    if changed is not None and not changed:
        print(f"code: the project's code is the one {job_dir.name} was submitted with ({code})", file=sys.stderr)
        return
    print(f"code: the resumed tasks run the project's code as it is now; it differs from the submitted in "
          f"{describe(changed) if changed is not None else '(the submitted copy is gone)'}", file=sys.stderr)
    if dry_run:
        return
    snapshot = freeze(project, runs_dir)
    print(summary(snapshot), file=sys.stderr)
    script = job_dir / "job.sbatch"
    lines = script.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("code=") and CODE_LINE_NOTE in line)
    write_atomic(script, "".join(lines[:start]) + code_lines(snapshot.dir) + "".join(lines[start + 2:]))


def render_script(grid_dir: Path, n: int, k: int, plan: JobPlan, name: str, code: Path, local: bool = False,
                  runs_per_gpu: int = 1) -> str:
    """The batch script: #SBATCH header from the resources, then the array task: its rows (runs_per_gpu of them, at
    once, each as its own srun step), each read from grid.json, run with the frozen copy `code` of the submitted
    code, and marked done when train.py exited 0."""
    tasks = task_count(n, runs_per_gpu)
    shared = "per GPU" if plan.res.get("gpus_per_node") else "sharing the CPUs"  # --gpus-per-node 0: no GPU
    packing = f", {runs_per_gpu} runs {shared}: {tasks} tasks" if runs_per_gpu > 1 else ""
    header = sbatch_header(name, f"0-{tasks - 1}%{k}", f"{n} rows{packing}, at most {k} tasks at a time", plan.res,
                           f"{grid_dir}/{'row' if runs_per_gpu == 1 else 'task'}-%a.out")
    q = shlex.quote
    return f"""#!/usr/bin/env bash
# Grid of {n} train.py runs, {runs_per_gpu} row(s) of grid.json per array task; written and submitted by slurm_train.py.
#   python slurm_train.py --resume {q(str(grid_dir))}   # resubmit the rows without a row-<i>/done marker
#   squeue -r -j <job id>;  tail -f {q(str(grid_dir))}/row-0.out
{script_head(plan, header, local)}
{code_lines(code)}grid_dir={q(str(grid_dir))}
rows_in_grid={n}
export {RUNS_PER_GPU_ENV}={runs_per_gpu}  # runs sharing this task's GPU(s): train.py names it when memory runs out
task=${{{LOCAL_TASK_ENV}:-${{SLURM_ARRAY_TASK_ID:?submit with sbatch, or run: python slurm_train.py --local}}}}

run_row() {{  # one row: read its argv, resume its own checkpoints, run train.py, mark it done only if that exited 0
  local row=$1 row_dir=$grid_dir/row-$1 start
  local -a args resume=() launch=()
  if [ -e "$row_dir/done" ]; then echo "row $row already finished ($row_dir/done)"; return 0; fi
  # Each argument NUL-terminated: a newline in an argument after `--` split it in two in every row.
  mapfile -d '' -t args < <("$python" -c 'import json, sys; row = json.load(open(sys.argv[1]))["rows"][int(sys.argv[2])]
sys.stdout.write("".join(arg + "\\0" for arg in row["argv"]))' "$grid_dir/grid.json" "$row")
  wait "$!" || {{ echo "cannot read row $row of $grid_dir/grid.json"; return 1; }}
  # A requeued or resumed row continues from its own checkpoints: Lightning's hpc_ckpt_N or last.ckpt, the newer.
  if [ -f "$row_dir/checkpoints/last.ckpt" ] && [ -z "$(find "$row_dir" -maxdepth 1 -name 'hpc_ckpt_*.ckpt' \\
       -newer "$row_dir/checkpoints/last.ckpt" 2>/dev/null)" ]; then
    resume=(--ckpt_path=last)
  fi
  if [ -n "${{SLURM_JOB_ID:-}}" ]; then
    # One step per run with one task per device (train.py checks that they match the Trainer's devices); packed runs
    # share the task's CPUs and GPUs (--overlap), each with its own DDP port.
    launch=(srun --ntasks-per-node="${{SLURM_NTASKS_PER_NODE:-1}}" --kill-on-bad-exit=1)
    if [ "${RUNS_PER_GPU_ENV}" -gt 1 ]; then
      launch+=(--overlap)
      MASTER_PORT=$("$python" -c 'from support.slurm.packing import free_port; print(free_port())') || return 1
      export MASTER_PORT
    fi
  fi
  start=$(date +%s.%N)
  echo "row $row on $(hostname) ($arch, $python), CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-}}:" \\
    "train.py ${{args[*]}}"
  "${{launch[@]}}" "$python" "$code/train.py" "${{resume[@]}}" "${{args[@]}}" --run_dir="$row_dir" \\
    || return $?
  mkdir -p "$row_dir"
  printf '{{"row": %s, "job": "%s", "host": "%s", "start": %s, "end": %s}}\\n' "$row" \\
    "${{SLURM_ARRAY_JOB_ID:-local}}_${{SLURM_ARRAY_TASK_ID:-$task}}" "$(hostname)" "$start" "$(date +%s.%N)" \\
    > "$row_dir/.done.$BASHPID"
  mv "$row_dir/.done.$BASHPID" "$row_dir/done"
}}

# Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch.
if [ -n "${{SLURM_CPUS_PER_TASK:-}}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
rows=()
for ((r = task * {runs_per_gpu}; r < (task + 1) * {runs_per_gpu} && r < rows_in_grid; r++)); do rows+=("$r"); done
pids=()
for row in "${{rows[@]}}"; do  # each row's output in its own row-<i>.out; one that fails leaves the others running
  run_row "$row" >> "$grid_dir/row-$row.out" 2>&1 &
  pids+=($!)
done
failed=()
for i in "${{!rows[@]}}"; do
  wait "${{pids[$i]}}" || failed+=("${{rows[$i]}}")
done
# A crashed, cancelled or requeued row has no done marker: the task fails, and --resume reruns only those rows.
if [ "${{#failed[@]}}" -gt 0 ]; then echo "row(s) ${{failed[*]}} of task $task failed: see row-<i>.out" >&2; exit 1; fi
"""


def render_agents_script(agents_dir: Path, sweep_id: str, count: int, k: int, plan: JobPlan, name: str,
                         code: Path) -> str:
    """wandb sweep agents as one array, one agent (one run) per task: this cluster's header and set-up, then
    sbatch_agent.sh (the one copy of what an agent's task does) of the frozen copy `code`, in the environment of the
    node's architecture; runs start from the project's root (their data and runs/ are the project's)."""
    header = sbatch_header(name, f"0-{count - 1}%{k}", f"{count} agents, at most {k} at a time", plan.res,
                           f"{agents_dir}/agent-%a.out")
    q = shlex.quote
    return f"""#!/usr/bin/env bash
# wandb sweep agents for {sweep_id}, one run each; written by slurm_train.py --agents, which submitted it.
{script_head(plan, header, local=False)}
{code_lines(code)}cd {q(str(REPO_DIR))}
export PATH="$(dirname "$python"):$PATH"  # sbatch_agent.sh runs the `python` and `wandb` it finds first
exec bash "$code/sbatch_agent.sh" {q(sweep_id)} 1
"""
