#!/usr/bin/env bash
# The Debian packages the tests need, installed when missing (make test runs this first):
# Chromium and its driver (browser tests of the QC report), a single-node SLURM with munge (the
# array-job test), python3-venv (the container-contract test builds a venv from Debian's Python,
# reachable by an unprivileged user). As root they are installed with apt-get; otherwise the
# script stops at once with the command to run.
set -euo pipefail
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
/usr/bin/python3 -c "import ensurepip, venv" 2>/dev/null || need+=(python3-venv)
[ ${#need[@]} -eq 0 ] && exit 0
command="apt-get update && apt-get install -y --no-install-recommends ${need[*]}"
if [ "$(id -u)" != 0 ]; then
    echo "make test needs Debian packages that are missing; as root, run: $command" >&2
    exit 1
fi
echo "installing the Debian packages the tests need: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}"
