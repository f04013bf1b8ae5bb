#!/usr/bin/env bash
# Run the ablation sweep as a driver of an existing Ray cluster: the compose `sweep` job.
# A Ray driver must run on a Ray node, so when RAY_HEAD_ADDRESS is set this container first
# joins the cluster as a node with no CPUs and no GPUs (it schedules no trials, it only hosts
# the driver); the node goes away with the container. All arguments go to sweeps/ablation.py.
#   RAY_HEAD_ADDRESS   host:port of the head (the same value as --address)
#   RAY_TEMP_DIR, RAY_AUTH_*: see ray-env.sh
#   REGABLATE_HOME     where sweeps/ablation.py lives (default: the repository of this script)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="${REGABLATE_HOME:-$(cd "${here}/../.." && pwd)}"
if [ -n "${RAY_HEAD_ADDRESS:-}" ]; then
    RAY_BLOCK=0 RAY_NUM_CPUS=0 RAY_NUM_GPUS=0 "${here}/start-ray-worker.sh"
    # exported by ray-env.sh in the child only: the driver needs the same auth mode
    if [ -z "${RAY_AUTH_MODE:-}" ]; then
        # shellcheck source=docker/scripts/ray-env.sh
        RAY_BLOCK=0 . "${here}/ray-env.sh"
    fi
fi
cd "${repo}"
exec python sweeps/ablation.py "$@"
