#!/usr/bin/env bash
# Stop the daemons that scripts/ci/start_slurm.sh started (and only those), by their recorded ids.
#   scripts/ci/stop_slurm.sh [STATE_DIR]        (default /tmp/episeg-slurm-ci)
set -uo pipefail

STATE_DIR=${1:-${EPISEG_SLURM_DIR:-/tmp/episeg-slurm-ci}}
PIDS=$STATE_DIR/started.pids
[ -s "$PIDS" ] || exit 0

# Newest first: slurmd, slurmctld, then munged.
tac "$PIDS" | while read -r name pid; do
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then continue; fi
    kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { echo "stop_slurm.sh: $name ($pid) ignored SIGTERM; killing it" >&2; kill -KILL "$pid"; }
done
: > "$PIDS"
