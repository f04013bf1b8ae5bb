# shellcheck shell=bash
# Sourced by start-ray-head.sh, start-ray-worker.sh and run-sweep.sh: one rule for Ray's token
# authentication on every node, so that a head and the nodes joining it always agree.
#
# Ray 2.52+ turns token auth on for a head when RAY_AUTH_MODE is unset and a token exists
# (~/.ray/auth_token, which any local ray.init() may have written), while a node that joins
# without RAY_AUTH_MODE=token is refused. Deciding it here, the same way on every node, closes
# that trap: a token given through RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or the default file
# means token mode; RAY_AUTH_MODE set by the caller always wins.
if [ -z "${RAY_AUTH_MODE:-}" ]; then
    if [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] \
        || [ -f "${HOME:-/nonexistent}/.ray/auth_token" ]; then
        export RAY_AUTH_MODE=token
    fi
fi
if [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] && [ ! -s "${RAY_AUTH_TOKEN_PATH}" ]; then
    echo "error: RAY_AUTH_TOKEN_PATH == ${RAY_AUTH_TOKEN_PATH}, expected a non-empty token file" >&2
    exit 2
fi

# Optional `ray start` flags shared by head and workers, each from one environment variable.
ray_common_args=(--disable-usage-stats)
[ -n "${RAY_NUM_CPUS:-}" ] && ray_common_args+=(--num-cpus "${RAY_NUM_CPUS}")
[ -n "${RAY_NUM_GPUS:-}" ] && ray_common_args+=(--num-gpus "${RAY_NUM_GPUS}")
[ -n "${RAY_NODE_IP:-}" ] && ray_common_args+=(--node-ip-address "${RAY_NODE_IP}")
[ -n "${RAY_TEMP_DIR:-}" ] && ray_common_args+=(--temp-dir "${RAY_TEMP_DIR}")
[ -n "${RAY_OBJECT_STORE_BYTES:-}" ] && ray_common_args+=(--object-store-memory "${RAY_OBJECT_STORE_BYTES}")
[ -n "${RAY_DASHBOARD_AGENT_PORT:-}" ] && ray_common_args+=(--dashboard-agent-listen-port "${RAY_DASHBOARD_AGENT_PORT}")
# RAY_BLOCK=1 (the default) keeps `ray start` in the foreground: the container's main process,
# and the one process a test or supervisor stops with SIGTERM to take the node down.
[ "${RAY_BLOCK:-1}" = "1" ] && ray_common_args+=(--block)
true
