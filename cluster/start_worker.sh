#!/usr/bin/env bash
# Join a worker node to a head started with cluster/start_head.sh.
#   RAY_AUTH_TOKEN=<token from the head's ~/.ray/auth_token> cluster/start_worker.sh HEAD_IP:6379
# The node's own address comes from RAY_BIND (default 127.0.0.1, i.e. a second node on the same host).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 HEAD_IP:PORT [extra ray start args]" >&2
  exit 2
fi
ADDRESS="$1"; shift
export RAY_AUTH_MODE=token
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -f "${HOME}/.ray/auth_token" ]; then
  echo "no token: set RAY_AUTH_TOKEN or copy the head's ~/.ray/auth_token to ${HOME}/.ray/auth_token" >&2
  exit 2
fi
NUM_GPUS_ARG=()
[ -n "${RAY_NUM_GPUS:-}" ] && NUM_GPUS_ARG=(--num-gpus "$RAY_NUM_GPUS")
ray start --address "$ADDRESS" --node-ip-address "${RAY_BIND:-127.0.0.1}" "${NUM_GPUS_ARG[@]}" "$@"
