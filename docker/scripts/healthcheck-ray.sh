#!/usr/bin/env bash
# Exit 0 when the Ray GCS at ${1:-127.0.0.1:$RAY_PORT} answers an authenticated health check:
# the compose health check of `ray-head` (and what the deployment test runs).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=docker/scripts/ray-env.sh
RAY_BLOCK=0 . "${here}/ray-env.sh"
exec ray health-check --address "${1:-127.0.0.1:${RAY_PORT:-6379}}"
