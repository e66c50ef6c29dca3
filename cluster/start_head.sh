#!/usr/bin/env bash
# Start a Ray head node with token authentication (Ray 2.60's default).
#
#   cluster/start_head.sh                       # head on 127.0.0.1: dashboard/jobs http://127.0.0.1:8265
#   RAY_BIND=10.0.0.5 cluster/start_head.sh     # head on a private network, for workers on other machines
#
# On a host without a token (no RAY_AUTH_TOKEN, no ~/.ray/auth_token) it creates one with
# `ray get-auth-token --generate` and prints how to hand it to workers and clients. The dashboard (jobs API)
# binds to RAY_BIND (default 127.0.0.1); never expose it on a public address. Ray's own servers (GCS, raylet,
# object manager) listen on all interfaces whatever RAY_BIND says, and Ray registers a head started on
# 127.0.0.1 under the machine's network address: the token guards them; firewall their ports on shared networks.
# Optional: RAY_GCS_PORT (6379), RAY_DASHBOARD_PORT (8265), RAY_NUM_CPUS, RAY_NUM_GPUS, RAY_TEMP_DIR;
# extra arguments go to `ray start` (e.g. --block, explicit ports).
set -euo pipefail
BIND="${RAY_BIND:-127.0.0.1}"
GCS_PORT="${RAY_GCS_PORT:-6379}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
ARGS=()
[ -n "${RAY_NUM_CPUS:-}" ] && ARGS+=(--num-cpus "$RAY_NUM_CPUS")
[ -n "${RAY_NUM_GPUS:-}" ] && ARGS+=(--num-gpus "$RAY_NUM_GPUS")
. "$(dirname "$0")/ray_temp_dir.sh"  # a TMPDIR too long for Ray's sockets: /tmp/ray-<uid>
[ -n "${RAY_TEMP_DIR:-}" ] && ARGS+=(--temp-dir "$RAY_TEMP_DIR")

export RAY_AUTH_MODE=token
TOKEN_FILE="${HOME}/.ray/auth_token"
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$TOKEN_FILE" ]; then
  ray get-auth-token --generate >/dev/null 2>&1
  echo "Created the cluster token ${TOKEN_FILE} (keep it secret)."
fi
if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
  HAND="export RAY_AUTH_TOKEN=<the value of RAY_AUTH_TOKEN on this head>"
else
  HAND="copy ${TOKEN_FILE} to the same path there, or: export RAY_AUTH_TOKEN=\$(cat ${TOKEN_FILE})"
fi
echo "Token for workers and clients: ${HAND}"
echo "  worker:  cluster/start_worker.sh ${BIND}:${GCS_PORT}"
echo "  client:  RAY_AUTH_MODE=token RAY_DASHBOARD=http://${BIND}:${DASHBOARD_PORT} cluster/submit.sh --config fashion_mnist ..."

ray start --head \
  --node-ip-address "$BIND" \
  --port "$GCS_PORT" \
  --dashboard-host "$BIND" \
  --dashboard-port "$DASHBOARD_PORT" \
  --disable-usage-stats \
  "${ARGS[@]}" "$@"
echo "Ray head: gcs ${BIND}:${GCS_PORT}, dashboard/jobs http://${BIND}:${DASHBOARD_PORT}"
