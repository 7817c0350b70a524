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
#   EPISEG_SKIP_VALIDATION     1: do not validate the dataset before submitting (it is validated once
#                              here by default; the array tasks then skip validation)
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

# Validate the dataset once here, not in every array task (13 s and 800 MB per task at 1,000
# subjects): the tasks get --skip-bids-validation and say so in their logs.
if [ "${EPISEG_SKIP_VALIDATION:-0}" != 1 ]; then
    if [ -n "${EPISEG_CMD:-}" ]; then
        read -r -a APP <<< "$EPISEG_CMD"
    else
        RUNTIME=${EPISEG_APPTAINER:-$(command -v apptainer || command -v singularity || true)}
        [ -n "$RUNTIME" ] || die "neither apptainer nor singularity is on PATH, and EPISEG_CMD is not set"
        SIF=${EPISEG_SIF:-$PWD/episeg-bids.sif}
        [ -f "$SIF" ] || die "image $SIF not found: set EPISEG_SIF (or EPISEG_CMD to run without a container)"
        APP=("$RUNTIME" run --cleanenv -B "$BIDS_DIR:$BIDS_DIR:ro" "$SIF")
    fi
    echo "submit.sh: validating $BIDS_DIR once for all array tasks (EPISEG_SKIP_VALIDATION=1 to skip)" >&2
    status=0
    "${APP[@]}" validate "$BIDS_DIR" || status=$?
    [ "$status" = 0 ] || { echo "submit.sh: $BIDS_DIR failed BIDS validation; nothing submitted" >&2; exit "$status"; }
    export EPISEG_VALIDATED_BY_SUBMIT=1
fi
for arg in ${PARTICIPANT_ARGS[@]+"${PARTICIPANT_ARGS[@]}"}; do
    [ "$arg" = --skip-bids-validation ] && export EPISEG_VALIDATED_BY_SUBMIT=0
done
[ "${EPISEG_VALIDATED_BY_SUBMIT:-0}" = 1 ] && PARTICIPANT_ARGS+=(--skip-bids-validation)

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
