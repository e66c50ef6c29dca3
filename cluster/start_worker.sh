#!/usr/bin/env bash
# Join a worker node to a head started with cluster/start_head.sh.
#
#   RAY_AUTH_TOKEN=<token> RAY_BIND=<this node's address> cluster/start_worker.sh HEAD_IP:6379
#
# The token comes from RAY_AUTH_TOKEN or ~/.ray/auth_token (a copy of the head's). RAY_BIND is the
# address this node is reached at (default 127.0.0.1; 127.0.0.2, 127.0.0.3 … give extra nodes on one
# machine). Optional: RAY_NUM_CPUS, RAY_NUM_GPUS, RAY_TEMP_DIR; extra arguments go to `ray start`.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 HEAD_IP:PORT [extra ray start args]" >&2
  exit 2
fi
ADDRESS="$1"; shift
export RAY_AUTH_MODE=token
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "${HOME}/.ray/auth_token" ]; then
  echo "no token: export RAY_AUTH_TOKEN=<token> or copy the head's ~/.ray/auth_token to ${HOME}/.ray/auth_token" >&2
  exit 2
fi
ARGS=()
[ -n "${RAY_NUM_CPUS:-}" ] && ARGS+=(--num-cpus "$RAY_NUM_CPUS")
[ -n "${RAY_NUM_GPUS:-}" ] && ARGS+=(--num-gpus "$RAY_NUM_GPUS")
. "$(dirname "$0")/ray_temp_dir.sh"  # a TMPDIR too long for Ray's sockets: /tmp/ray-<uid>
[ -n "${RAY_TEMP_DIR:-}" ] && ARGS+=(--temp-dir "$RAY_TEMP_DIR")
exec ray start --address "$ADDRESS" --node-ip-address "${RAY_BIND:-127.0.0.1}" --disable-usage-stats \
  "${ARGS[@]}" "$@"
