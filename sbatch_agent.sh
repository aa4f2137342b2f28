#!/usr/bin/env bash
# wandb sweep agents as a SLURM job array: every array task runs one agent for COUNT runs (default 1).
#
#   python sweep.py                                                   # create the sweep, print its id
#   sbatch --array=0-19%4 sbatch_agent.sh ENTITY/PROJECT/SWEEP_ID      # 20 runs, at most 4 at a time
#   sbatch --array=0-4%2 sbatch_agent.sh ENTITY/PROJECT/SWEEP_ID 3    # 5 agents, 3 runs each, 2 at a time
#   sbatch --array=0-9%4 --time=02:00:00 sbatch_agent.sh ...           # options given here beat the header
#
# Submit from the repository root (the agent runs `python train.py ...` there) in a shell where the project's
# environment is active: jobs inherit it. Or uncomment an activation line below the #SBATCH header.
#
# How a run is started: ONE `wandb agent` runs in this batch shell and asks the server for a config. For each
# run it starts the sweep's command, `python train.py --key=value ...`, where `python` is a small launcher this
# script puts first on the agent's PATH: it runs the command under `srun --ntasks-per-node=<this job's>`, one
# Slurm task per device. So every DDP rank is started by Slurm with the same argv (Lightning's SLURMEnvironment
# sets ranks from the task ids), and only one agent per run talks to the sweep (an agent per srun task would
# pull a different config for every rank). Keep --ntasks-per-node equal to the GPUs per node: the Trainer's
# devices ("auto" uses every GPU the job sees).
#
# Nodes without internet: a wandb agent does not work there. It gets every run's settings from the wandb server,
# and WANDB_MODE=offline does not change that. So each task first runs `python sweep.py --check-agent` and
# exits at once with one line when WANDB_MODE is offline or the server does not answer within 10 s, rather than
# failing run after run. On such clusters run the same sweep offline instead: `python sweep.py --list` (or
# slurm_train.py) enumerates SWEEP_CONFIG's grid or seeded random draws without a server; log offline and
# `wandb sync` the runs from a login node.
#
# Time limits and preemption: --signal=SIGUSR1@90 sends SIGUSR1 to the run's tasks 90 s before the time limit;
# Lightning then saves a checkpoint in the run directory and requeues this array task (--requeue). train.py
# marks the wandb run as preempting, so the sweep hands its config, with the same run id, to the next agent
# that asks (this task once restarted, or another) instead of losing it.
#
# This header is the generic cluster's of clusters.toml (tests/test_clusters.py checks that they agree). On HEC,
# Bede or a cluster you add there, let slurm_train.py write and submit the same agents with that cluster's header
# and set-up, checked against its limits, in the environment of the node's architecture:
#   python slurm_train.py --cluster bede --account PROJECT --agents ENTITY/PROJECT/SWEEP_ID --count 20 --max-concurrent 4
#
#SBATCH --job-name=sweep-agent
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1               # = the Trainer's devices: one task per GPU
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=4                 # data loading workers + the main process
#SBATCH --mem=16G                         # memory per node
#SBATCH --time=08:00:00
#SBATCH --signal=SIGUSR1@90               # to train.py 90 s before the limit: Lightning checkpoints, requeues
#SBATCH --requeue
#SBATCH --open-mode=append                # a requeued task appends to its log
#SBATCH --output=sweep-agent-%A_%a.out    # one log per array task

# The environment: jobs inherit the submitting shell's. Or activate one here (uncomment one; before `set -u`,
# as conda's activation scripts read unset variables):
# source "$(make -s venv-path)/bin/activate"               # the venv `make env` built for this architecture
# module add miniforge && source activate "$global_storage/mlmodeldev"   # HEC's conda (its python page)
# source "/nobackup/projects/<project>/$USER/$(uname -m)/miniconda3/bin/activate"   # Bede: one conda per arch
set -euo pipefail

die() { echo "sbatch_agent.sh: $*" >&2; exit 1; }
usage="usage: sbatch --array=0-N%K sbatch_agent.sh ENTITY/PROJECT/SWEEP_ID [COUNT]"
if [ $# -lt 1 ] || [ $# -gt 2 ]; then die "$usage"; fi
sweep_id=$1
count=${2:-1}
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm job: submit it with sbatch (for agents on this machine: ./run_sweep.sh)"
if [ ! -f train.py ] || [ ! -f sweep.py ]; then die "no train.py in $PWD: submit from the repository root"; fi
python=$(command -v python) || die "no python on PATH: activate the project's environment before sbatch (or in this script)"
command -v wandb >/dev/null || die "no wandb on PATH: activate the project's environment before sbatch (or in this script)"
# The code every run of this task runs: the frozen copy slurm_train.py --agents made when it submitted the job
# (MLMODELDEV_CODE), else one made now, when the task starts (a plain `sbatch sbatch_agent.sh` cannot freeze at
# submission: Slurm keeps only this script).
code=${MLMODELDEV_CODE:-}
if [ -z "$code" ]; then
  code=$(python -m support.provenance.snapshot --runs-dir runs) || exit 1
  echo "sbatch_agent.sh: code frozen into $code when this task started (slurm_train.py --agents freezes it at submission)"
fi
python "$code/sweep.py" --check-agent || exit 1

# The launcher the agent finds as `python`: one Slurm task per device, each the real python with the same argv, the
# sweep's program (train.py) taken from the frozen copy; the run's directory and data stay the project's ($PWD).
# SRUN_CPUS_PER_TASK: since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch.
launch_dir=$(mktemp -d "${TMPDIR:-/tmp}/sweep-agent.XXXXXX")
trap 'rm -rf "$launch_dir"' EXIT
cat > "$launch_dir/python" <<EOF
#!/usr/bin/env bash
export PATH=$(printf %q "$PATH") PYTHONPATH=$(printf %q "$code")
if [ "\${1:-}" = train.py ]; then shift; set -- $(printf %q "$code/train.py") "\$@"; fi
exec srun --ntasks-per-node=${SLURM_NTASKS_PER_NODE:-1} --kill-on-bad-exit=1 $(printf %q "$python") "\$@"
EOF
chmod +x "$launch_dir/python"
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi

task="${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_${SLURM_ARRAY_TASK_ID:-0}"
echo "sweep-agent $task on $(hostname): wandb agent --count $count $sweep_id," \
     "${SLURM_NTASKS_PER_NODE:-1} task(s) per run, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}"
# --forward-signals: a scancel or preemption SIGTERM reaching the agent is passed on to the run (srun forwards
# it to the tasks), so the run can end cleanly instead of being orphaned.
PATH="$launch_dir:$PATH" wandb agent --forward-signals --count "$count" "$sweep_id"
