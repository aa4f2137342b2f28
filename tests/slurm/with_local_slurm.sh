#!/usr/bin/env bash
# with_local_slurm.sh COMMAND [ARGS...] - run COMMAND with the local test Slurm up, then put things back.
#
#   tests/slurm/with_local_slurm.sh python -m pytest        # what `make test` runs
#
# Starts the cluster (local_slurm.sh start: installs Slurm on first use) when it can: as root, on Debian or
# Ubuntu. A cluster that was already up is used and left running; one started here is stopped afterwards,
# also on Ctrl-C. When none can be started COMMAND runs anyway: the Slurm tests then skip with the reason,
# or fail under CI=true. Exports SLURM_CONF for COMMAND. Exits with COMMAND's status.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
[ $# -gt 0 ] || { sed -n '2,9p' "$0"; exit 2; }
eval "$("$here/local_slurm.sh" env)"   # export SLURM_CONF=<state dir>/etc/slurm.conf
state_dir=$(dirname "$(dirname "$SLURM_CONF")")
log="${TMPDIR:-/tmp}/with_local_slurm.$$.log"
started=0
keep_log=0

stop_cluster() {
  if [ "$started" = 1 ]; then
    if ! "$here/local_slurm.sh" stop >> "$log" 2>&1; then
      keep_log=1
      echo "with_local_slurm.sh: stopping the cluster failed, see $log" >&2
    fi
    started=0
  fi
  if [ "$keep_log" = 0 ]; then rm -f "$log"; fi
}
trap stop_cluster EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -f "$SLURM_CONF" ] && command -v scontrol >/dev/null && timeout 10 scontrol ping >/dev/null 2>&1; then
  echo "with_local_slurm.sh: using the Slurm that is already up ($SLURM_CONF)" >&2
elif [ "$(id -u)" != 0 ]; then
  echo "with_local_slurm.sh: not root, so no local Slurm: Slurm tests will skip (or fail under CI=true)" >&2
elif ! command -v slurmctld >/dev/null && ! command -v apt-get >/dev/null; then
  echo "with_local_slurm.sh: Slurm is not installed and there is no apt-get: Slurm tests will skip" >&2
elif "$here/local_slurm.sh" start --state-dir "$state_dir" > "$log" 2>&1; then
  started=1
  echo "with_local_slurm.sh: started a local Slurm for this command ($SLURM_CONF); stopped afterwards" >&2
else
  keep_log=1
  echo "with_local_slurm.sh: could not start a local Slurm (log: $log):" >&2
  tail -5 "$log" >&2
fi

"$@"
status=$?
stop_cluster
exit "$status"
