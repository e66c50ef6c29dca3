#!/usr/bin/env bash
# Start a Ray head node. Ray (2.60+) protects the dashboard/job API with a token: clients need
# RAY_AUTH_MODE=token and the cluster's token (~/.ray/auth_token on the head, or RAY_AUTH_TOKEN).
# Every port binds to 127.0.0.1 unless RAY_BIND is set (e.g. the head's private-network address
# when workers on other machines must join); never expose the dashboard without the token.
#
#   cluster/start_head.sh                       # local head, 127.0.0.1
#   RAY_BIND=10.0.0.5 cluster/start_head.sh     # head reachable on a private network
set -euo pipefail
BIND="${RAY_BIND:-127.0.0.1}"
GCS_PORT="${RAY_GCS_PORT:-6379}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
NUM_CPUS_ARG=()
[ -n "${RAY_NUM_CPUS:-}" ] && NUM_CPUS_ARG=(--num-cpus "$RAY_NUM_CPUS")
NUM_GPUS_ARG=()
[ -n "${RAY_NUM_GPUS:-}" ] && NUM_GPUS_ARG=(--num-gpus "$RAY_NUM_GPUS")
TEMP_ARG=()
[ -n "${RAY_TEMP_DIR:-}" ] && TEMP_ARG=(--temp-dir "$RAY_TEMP_DIR")

export RAY_AUTH_MODE=token
ray start --head \
  --node-ip-address "$BIND" \
  --port "$GCS_PORT" \
  --dashboard-host "$BIND" \
  --dashboard-port "$DASHBOARD_PORT" \
  "${NUM_CPUS_ARG[@]}" "${NUM_GPUS_ARG[@]}" "${TEMP_ARG[@]}" "$@"

TOKEN_FILE="${HOME}/.ray/auth_token"
echo
echo "Ray head: gcs ${BIND}:${GCS_PORT}, dashboard/jobs http://${BIND}:${DASHBOARD_PORT}"
if [ -f "$TOKEN_FILE" ]; then
  echo "Token: ${TOKEN_FILE} (copy it to clients as ~/.ray/auth_token, or export RAY_AUTH_TOKEN)"
fi
echo "Workers: RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<token> cluster/start_worker.sh ${BIND}:${GCS_PORT}"
echo "Submit:  cluster/submit.sh --config fashion_mnist --set data.shards=/shared/shards/fashion_mnist"
