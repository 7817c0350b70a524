#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine (for CI and tests/test_slurm.py).
#
#   scripts/ci/start_slurm.sh [STATE_DIR]       (as root; default STATE_DIR /tmp/episeg-slurm-ci)
#   export SLURM_CONF=STATE_DIR/slurm.conf      then sbatch/squeue/scontrol talk to it
#   scripts/ci/stop_slurm.sh [STATE_DIR]
#
# Installs Debian's slurm-wlm and munge if they are missing, starts munged (unless one already
# answers), writes a minimal slurm.conf for localhost (2 CPUs, no cgroups: proctrack/linuxproc,
# task/none, no accounting) and starts slurmctld and slurmd with it. Only the daemons started here
# are recorded in STATE_DIR/started.pids, which stop_slurm.sh stops. Prints the slurm.conf path.
# Exits non-zero with the daemons' own log lines when the node does not become idle.
set -euo pipefail

STATE_DIR=${1:-${EPISEG_SLURM_DIR:-/tmp/episeg-slurm-ci}}
CPUS=${EPISEG_SLURM_CPUS:-2}
CTLD_PORT=${EPISEG_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${EPISEG_SLURMD_PORT:-6818}
NODE=$(hostname -s)
# 90% of the RAM, so jobs may ask for --mem (memory is not a consumable resource here: CR_CPU).
MEM_MB=${EPISEG_SLURM_MEM_MB:-$(awk '/^MemTotal:/ { print int($2 / 1024 * 0.9) }' /proc/meminfo)}

die() { echo "start_slurm.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts munged, slurmctld, slurmd)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    echo "start_slurm.sh: installing slurm-wlm and munge (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

mkdir -p "$STATE_DIR"/{state,spool}
: > "$STATE_DIR/started.pids"
CONF=$STATE_DIR/slurm.conf

# munge: one daemon per machine, on its default socket; reuse one that already answers.
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || { mungekey --create --force 2>/dev/null || /usr/sbin/create-munge-key -f; }
    chown munge:munge /etc/munge /etc/munge/munge.key && chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
    [ -s /run/munge/munged.pid ] || die "munged did not start; see /var/log/munge/munged.log"
    echo "munged $(cat /run/munge/munged.pid)" >> "$STATE_DIR/started.pids"
    munge -n </dev/null | unmunge >/dev/null || die "munge does not answer after starting munged"
fi

cat > "$CONF" <<EOF
# Single-node SLURM for CI, written by scripts/ci/start_slurm.sh.
ClusterName=episegci
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
# No cgroups in CI sandboxes: plain /proc process tracking, no task binding, no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Keep finished jobs visible to scontrol for 10 minutes (the tests read their exit codes).
MinJobAge=600
SlurmdTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

export SLURM_CONF=$CONF
if ! scontrol ping 2>/dev/null | grep -q "is UP"; then
    slurmctld -f "$CONF" || die "slurmctld failed: $(tail -5 "$STATE_DIR/slurmctld.log" 2>/dev/null)"
    for _ in $(seq 100); do [ -s "$STATE_DIR/slurmctld.pid" ] && break; sleep 0.1; done
    echo "slurmctld $(cat "$STATE_DIR/slurmctld.pid")" >> "$STATE_DIR/started.pids"
fi
if ! [ -s "$STATE_DIR/slurmd.pid" ] || ! kill -0 "$(cat "$STATE_DIR/slurmd.pid")" 2>/dev/null; then
    slurmd -f "$CONF" || die "slurmd failed: $(tail -5 "$STATE_DIR/slurmd.log" 2>/dev/null)"
    for _ in $(seq 100); do [ -s "$STATE_DIR/slurmd.pid" ] && break; sleep 0.1; done
    echo "slurmd $(cat "$STATE_DIR/slurmd.pid")" >> "$STATE_DIR/started.pids"
fi

for _ in $(seq 60); do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    case "$state" in
        idle*|mixed*|allocated*) echo "$CONF"; exit 0 ;;
        down*|drain*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
done
echo "start_slurm.sh: node $NODE is not idle after 60 s (state: ${state:-none})" >&2
tail -n 20 "$STATE_DIR/slurmctld.log" "$STATE_DIR/slurmd.log" >&2 2>/dev/null || true
exit 1
