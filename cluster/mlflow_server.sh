#!/usr/bin/env bash
# An MLflow tracking server that Ray workers log to (set MLFLOW_TRACKING_URI=http://HOST:PORT in the
# job's runtime_env). Binds 127.0.0.1 by default; on a cluster set MLFLOW_HOST to a private address and
# put authentication in front of it (MLflow's basic-auth app, below, or a reverse proxy): workers then
# need MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
#   cluster/mlflow_server.sh                         # sqlite:///mlruns.db, artifacts in ./mlartifacts
#   MLFLOW_HOST=10.0.0.5 MLFLOW_AUTH=1 cluster/mlflow_server.sh
#   cluster/mlflow_server.sh --workers 1             # extra arguments go to `mlflow server`
set -euo pipefail
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///mlruns.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts}"
AUTH_ARGS=()
[ "${MLFLOW_AUTH:-0}" = 1 ] && AUTH_ARGS=(--app-name basic-auth)
# --serve-artifacts: workers upload through the server, so they need no access to its disk.
exec mlflow server \
  --host "$HOST" --port "$PORT" \
  --backend-store-uri "$BACKEND" \
  --artifacts-destination "$ARTIFACTS" \
  --serve-artifacts \
  "${AUTH_ARGS[@]}" "$@"
