#!/usr/bin/env bash
# Join a Ray worker node to a running head. Used unchanged by the images (compose
# `ray-worker`) and by tests/deploy. Configuration comes from the environment:
#   RAY_HEAD_ADDRESS (required)  host:port of the head's GCS, e.g. ray-head:6379
#   RAY_NUM_CPUS, RAY_NUM_GPUS (detected when unset), RAY_NODE_IP, RAY_TEMP_DIR,
#   RAY_OBJECT_STORE_BYTES, RAY_DASHBOARD_AGENT_PORT, RAY_BLOCK (1): see ray-env.sh
#   RAY_AUTH_MODE, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH: must match the head's
# Extra arguments are passed on to `ray start`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${RAY_HEAD_ADDRESS:-}" ]; then
    echo "error: RAY_HEAD_ADDRESS is unset, expected the head's host:port (e.g. ray-head:6379)" >&2
    exit 2
fi
# shellcheck source=docker/scripts/ray-env.sh
. "${here}/ray-env.sh"

exec ray start --address "${RAY_HEAD_ADDRESS}" "${ray_common_args[@]}" "$@"
