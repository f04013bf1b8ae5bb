#!/usr/bin/env bash
# Start a Ray head node. Used unchanged by the images (compose `ray-head`), by a laptop
# deployment and by tests/deploy. Configuration comes from the environment:
#   RAY_PORT (6379)               GCS port the workers and drivers connect to
#   RAY_DASHBOARD_HOST (127.0.0.1) interface the dashboard binds; compose sets 0.0.0.0 inside
#                                 the container network and publishes it on the host's 127.0.0.1
#   RAY_DASHBOARD_PORT (8265)
#   RAY_NUM_CPUS, RAY_NUM_GPUS, RAY_NODE_IP, RAY_TEMP_DIR, RAY_OBJECT_STORE_BYTES,
#   RAY_DASHBOARD_AGENT_PORT, RAY_BLOCK (1): see ray-env.sh
#   RAY_AUTH_MODE, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH: Ray token authentication
# Extra arguments are passed on to `ray start`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=docker/scripts/ray-env.sh
. "${here}/ray-env.sh"

exec ray start --head \
    --port "${RAY_PORT:-6379}" \
    --dashboard-host "${RAY_DASHBOARD_HOST:-127.0.0.1}" \
    --dashboard-port "${RAY_DASHBOARD_PORT:-8265}" \
    "${ray_common_args[@]}" "$@"
