#!/usr/bin/env bash
# Start the MLflow tracking server. Used unchanged by the images (compose `mlflow`, the
# Kubernetes Deployment), by a laptop deployment and by tests/deploy. From the environment:
#   MLFLOW_HOST (127.0.0.1)      interface to bind; containers set 0.0.0.0 and publish the port
#                                on the host's 127.0.0.1 only (compose) or keep it ClusterIP (k8s)
#   MLFLOW_PORT (5000)
#   MLFLOW_BACKEND_STORE_URI     run/metric store (sqlite:///... or postgresql://user@host/db);
#                                default sqlite:///$MLFLOW_HOME/mlflow.db
#   PGPASSWORD_FILE              file holding the PostgreSQL password; read into PGPASSWORD,
#                                which the driver uses, so no password sits in a URI or argv
#   MLFLOW_ARTIFACTS_DESTINATION where the server stores artifacts it proxies
#                                (default $MLFLOW_HOME/mlartifacts)
#   MLFLOW_HOME (current directory)
#   MLFLOW_WORKERS (2)           server worker processes
#   MLFLOW_ALLOWED_HOSTS         Host headers accepted (MLflow's default: localhost and private
#                                IPs); containers add the service name, e.g. mlflow:5000
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION (false here; MLflow's default is true) server-side GenAI
#                                jobs, which regablate never submits: left on, MLflow 3.17 starts
#                                a pool of huey consumer processes next to the server
# Extra arguments are passed on to `mlflow server`.
set -euo pipefail
home="${MLFLOW_HOME:-$PWD}"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///${home}/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-${home}/mlartifacts}"

export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

case "${backend}" in
    *://*:*@*)
        echo "error: MLFLOW_BACKEND_STORE_URI carries a password; give it through PGPASSWORD_FILE instead" >&2
        exit 2 ;;
esac
if [ -n "${PGPASSWORD_FILE:-}" ]; then
    if [ ! -s "${PGPASSWORD_FILE}" ]; then
        echo "error: PGPASSWORD_FILE == ${PGPASSWORD_FILE}, expected a non-empty password file" >&2
        exit 2
    fi
    PGPASSWORD="$(tr -d '\r\n' < "${PGPASSWORD_FILE}")"
    export PGPASSWORD
fi
case "${artifacts}" in
    *://*) ;;                        # object store (s3://, gs://, ...): nothing to create
    *) mkdir -p "${artifacts}" ;;
esac

args=(server
    --host "${MLFLOW_HOST:-127.0.0.1}"
    --port "${MLFLOW_PORT:-5000}"
    --backend-store-uri "${backend}"
    --serve-artifacts
    --artifacts-destination "${artifacts}"
    --workers "${MLFLOW_WORKERS:-2}")
[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ] && args+=(--allowed-hosts "${MLFLOW_ALLOWED_HOSTS}")
exec mlflow "${args[@]}" "$@"
