#!/bin/bash
# Submit the episeg-bids participant array (one task per participant) and the group job that
# waits for it (--dependency=afterany:<array job id>).
#
#   scripts/submit.sh BIDS_DIR OUTPUT_DIR [participant options...] [--group group options...]
#
# Prints "ARRAY_JOB_ID GROUP_JOB_ID" on stdout (a summary on stderr). Logs go to
# OUTPUT_DIR/logs/slurm/ (ignored by the BIDS validator).
#
# Environment (also read by the two sbatch scripts, which get the whole environment):
#   EPISEG_SIF or EPISEG_CMD   the image, or a command to run instead of it (see episeg_array.sbatch)
#   EPISEG_SBATCH_ARGS         sbatch options for both jobs, e.g. "--account=abc --partition=cpu"
#   EPISEG_ARRAY_SBATCH_ARGS   sbatch options for the array only, e.g. "--gpus=1 --cpus-per-task=4"
#   EPISEG_GROUP_SBATCH_ARGS   sbatch options for the group job only
#   EPISEG_ARRAY_LIMIT         at most this many array tasks at once (--array=0-N%LIMIT)
#   EPISEG_PARTICIPANTS_FILE   a TSV with a header and participant_id first (default BIDS_DIR/participants.tsv)
set -euo pipefail

die() { echo "submit.sh: $*" >&2; exit 64; }
[ $# -ge 2 ] || die "usage: scripts/submit.sh BIDS_DIR OUTPUT_DIR [participant options...] [--group group options...]"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BIDS_DIR=$(realpath -e "$1") || die "BIDS folder $1 does not exist"
OUT_DIR=$(realpath -m "$2")
shift 2
PARTICIPANT_ARGS=()
while [ $# -gt 0 ] && [ "$1" != "--group" ]; do PARTICIPANT_ARGS+=("$1"); shift; done
[ $# -gt 0 ] && shift
GROUP_ARGS=("$@")

# The same listing as episeg_array.sbatch: task i = data line i+1.
if [ -f "${EPISEG_PARTICIPANTS_FILE:-$BIDS_DIR/participants.tsv}" ]; then
    N=$(awk -F'\t' 'NR > 1 { sub(/\r$/, ""); if ($1 != "") n++ } END { print n + 0 }' \
        "${EPISEG_PARTICIPANTS_FILE:-$BIDS_DIR/participants.tsv}")
else
    N=$(find "$BIDS_DIR" -mindepth 1 -maxdepth 1 -type d -name 'sub-*' | wc -l)
fi
[ "$N" -gt 0 ] || die "no participant listed in ${EPISEG_PARTICIPANTS_FILE:-$BIDS_DIR/participants.tsv}"

LOGS=$OUT_DIR/logs/slurm
mkdir -p "$LOGS"
read -r -a COMMON <<< "${EPISEG_SBATCH_ARGS:-}"
read -r -a ARRAY_OPTS <<< "${EPISEG_ARRAY_SBATCH_ARGS:-}"
read -r -a GROUP_OPTS <<< "${EPISEG_GROUP_SBATCH_ARGS:-}"

ARRAY_ID=$(sbatch --parsable --export=ALL --array="0-$((N - 1))${EPISEG_ARRAY_LIMIT:+%$EPISEG_ARRAY_LIMIT}" \
    --output="$LOGS/episeg-%A_%a.log" ${COMMON[@]+"${COMMON[@]}"} ${ARRAY_OPTS[@]+"${ARRAY_OPTS[@]}"} \
    "$HERE/episeg_array.sbatch" "$BIDS_DIR" "$OUT_DIR" ${PARTICIPANT_ARGS[@]+"${PARTICIPANT_ARGS[@]}"})
ARRAY_ID=${ARRAY_ID%%;*}  # "id;cluster" on multi-cluster sites
GROUP_ID=$(sbatch --parsable --export=ALL --dependency="afterany:$ARRAY_ID" \
    --output="$LOGS/episeg-group-%j.log" ${COMMON[@]+"${COMMON[@]}"} ${GROUP_OPTS[@]+"${GROUP_OPTS[@]}"} \
    "$HERE/episeg_group.sbatch" "$BIDS_DIR" "$OUT_DIR" ${GROUP_ARGS[@]+"${GROUP_ARGS[@]}"})
GROUP_ID=${GROUP_ID%%;*}

echo "submit.sh: array job $ARRAY_ID ($N participant(s)), group job $GROUP_ID (afterany:$ARRAY_ID); logs in $LOGS" >&2
echo "$ARRAY_ID $GROUP_ID"
