#!/usr/bin/env bash
# wandb sweep agents on this machine: one per visible GPU, each pinned to it with CUDA_VISIBLE_DEVICES, or one
# on the CPU when there is no GPU. Each agent asks the wandb server for a config and runs `python train.py
# --key=value ...` for it, until the sweep is done or it has run COUNT runs.
#
#   python sweep.py                                   # create the sweep, print ENTITY/PROJECT/SWEEP_ID
#   ./run_sweep.sh ENTITY/PROJECT/SWEEP_ID            # agents run until the sweep is done
#   ./run_sweep.sh ENTITY/PROJECT/SWEEP_ID 5          # each agent stops after 5 runs
#   CUDA_VISIBLE_DEVICES=0,2 ./run_sweep.sh ...       # only these GPUs ("" for one agent on the CPU)
#   PYTHON=~/.cache/mlmodeldev/venv-<hash>/bin/python ./run_sweep.sh ...   # that environment's python and wandb
#
# Ctrl-C stops cleanly: each agent passes it to its run, which ends its epoch loop (Lightning's graceful
# shutdown), closes its wandb run, and the agent exits. A second Ctrl-C terminates the runs, a third kills them.
# With several agents, each one's output goes to runs/agents/<sweep>-gpu<N>.log (one agent: the terminal).
# Without a wandb server (WANDB_MODE=offline, no internet) agents cannot work: use `python sweep.py --list`.
set -euo pipefail
set -m  # each agent in its own process group: Ctrl-C reaches this script only, which hands one to each agent

die() { echo "run_sweep.sh: $*" >&2; exit 1; }
if [ $# -lt 1 ] || [ $# -gt 2 ]; then die "usage: ./run_sweep.sh ENTITY/PROJECT/SWEEP_ID [COUNT]"; fi
sweep_id=$1
count_args=()
if [ $# -eq 2 ]; then count_args=(--count "$2"); fi
cd "$(dirname "$0")"  # the agent runs `python train.py` from here
if [ -n "${PYTHON:-}" ]; then PATH="$(dirname "$PYTHON"):$PATH"; export PATH; fi
command -v python >/dev/null || die "no python on PATH: activate the project's environment (or set PYTHON=...)"
command -v wandb >/dev/null || die "no wandb on PATH: activate the project's environment (or set PYTHON=...)"
# Every run starts from a frozen copy of the code as it is now (support/provenance/snapshot.py): edits made while the
# agents run reach no run of theirs. Runs write into this project's runs/ and read its data.
code=$(python -m support.provenance.snapshot --runs-dir runs) || exit 1
echo "run_sweep.sh: code frozen into $code"
python "$code/sweep.py" --check-agent || exit 1
real_python=$(command -v python)
launch_dir=$(mktemp -d "${TMPDIR:-/tmp}/run-sweep.XXXXXX")
trap 'rm -rf "$launch_dir"' EXIT
cat > "$launch_dir/python" <<EOF
#!/usr/bin/env bash
export PYTHONPATH=$(printf %q "$code")
if [ "\${1:-}" = train.py ]; then shift; set -- $(printf %q "$code/train.py") "\$@"; fi
exec $(printf %q "$real_python") "\$@"
EOF
chmod +x "$launch_dir/python"
PATH="$launch_dir:$PATH"  # the agents run the sweep's command, `python train.py ...`: this launcher, then the copy

# The devices: CUDA_VISIBLE_DEVICES when set (ids or UUIDs), else every GPU nvidia-smi lists, else the CPU.
devices=()
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
  IFS=, read -r -a devices <<< "$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi >/dev/null && gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null); then
  mapfile -t devices <<< "$gpus"
fi
if [ ${#devices[@]} -eq 0 ]; then devices=(""); fi  # one agent, on the CPU

mkdir -p runs/agents
pids=()
for device in "${devices[@]}"; do
  device=${device// /}
  cmd=(wandb agent --forward-signals ${count_args[@]+"${count_args[@]}"} "$sweep_id")
  if [ ${#devices[@]} -eq 1 ]; then
    echo "run_sweep.sh: agent on ${device:+GPU }${device:-CPU}: ${cmd[*]}"
    CUDA_VISIBLE_DEVICES=$device "${cmd[@]}" < /dev/null &
  else
    log="runs/agents/${sweep_id//\//_}-gpu${device}.log"
    echo "run_sweep.sh: agent on GPU $device: ${cmd[*]}  (log: $log)"
    CUDA_VISIBLE_DEVICES=$device "${cmd[@]}" < /dev/null >> "$log" 2>&1 &
  fi
  pids+=($!)
done

# shellcheck disable=SC2317  # called by the trap below
stop() {
  echo "run_sweep.sh: stopping: each run ends cleanly and then its agent (Ctrl-C again to terminate the runs)" >&2
  kill -INT "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM

status=0
for pid in "${pids[@]}"; do
  while true; do
    rc=0
    wait "$pid" || rc=$?
    if kill -0 "$pid" 2>/dev/null; then continue; fi  # wait was interrupted by Ctrl-C: the agent is still going
    if [ "$rc" -ne 0 ]; then status=$rc; fi
    break
  done
done
exit "$status"
