#!/usr/bin/env bash
# Submit a training job to a running cluster with token auth:
#   cluster/submit.sh --config fashion_mnist --set data.shards=/shared/shards/fashion_mnist
# Needs the cluster's token (~/.ray/auth_token or RAY_AUTH_TOKEN). RAY_DASHBOARD (default
# http://127.0.0.1:8265) is the head's dashboard/job address. `ray job stop <id>` checkpoints at the
# next step: runtime_env.yaml gives it RAY_JOB_STOP_WAIT_TIME_S=60 (Ray's default SIGKILLs after 3 s).
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=token
exec ray job submit \
  --address "${RAY_DASHBOARD:-http://127.0.0.1:8265}" \
  --working-dir . \
  --runtime-env cluster/runtime_env.yaml \
  -- python -m pipeline.train "$@"
