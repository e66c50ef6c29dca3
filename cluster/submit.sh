#!/usr/bin/env bash
# Submit a training job to a running cluster with token auth:
#   cluster/submit.sh --config fashion_mnist --set data.shards=/shared/shards/fashion_mnist
# Needs the cluster's token (~/.ray/auth_token or RAY_AUTH_TOKEN). RAY_DASHBOARD (default
# http://127.0.0.1:8265) is the head's dashboard/job address. `ray job stop <id>` checkpoints at the
# next step: runtime_env.yaml gives it RAY_JOB_STOP_WAIT_TIME_S=60 (Ray's default SIGKILLs after 3 s).
# The console shows the job's id once, the job's own output and how it ended; Ray's CLI also logs its
# packaging and upload steps, a "next steps" block and the job supervisor's set-up: PIPELINE_SUBMIT_VERBOSE=1
# shows those too. The exit code is `ray job submit`'s.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=token
SUBMIT=(ray job submit --log-style record --log-color false
  --address "${RAY_DASHBOARD:-http://127.0.0.1:8265}"
  --working-dir .
  --runtime-env cluster/runtime_env.yaml
  -- python -m pipeline.train "$@")
if [ "${PIPELINE_SUBMIT_VERBOSE:-0}" = 1 ]; then
  exec "${SUBMIT[@]}"
fi
# Records of Ray's CLI look like "2026-12-01 22:39:16,277<TAB>INFO cli.py:42 -- message".
RECORD='^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:,]+[[:space:]]+(INFO|SUCC|WARNING|ERROR) (cli|packaging|dashboard_sdk|sdk|working_dir|job_manager)\.py:[0-9]+ -- '
# In the background, so that a signal to this script reaches the CLI at once (bash defers traps while a
# foreground command runs): SIGTERM or Ctrl-C ends the CLI, as for a plain `ray job submit`.
trap 'kill -TERM $(jobs -p) "$!" 2>/dev/null || true' TERM INT HUP  # the CLI (the job's first process) and sed ($!)
# Kept: the job's id (with how to follow and stop it), Ray CLI's warnings and errors (the job's end among
# them) and "succeeded"; dropped: its other records, the supervisor's "Running entrypoint" line, blank lines.
"${SUBMIT[@]}" 2>&1 | sed -u -E \
  -e "/${RECORD}/{" \
  -e "  /${RECORD}-+\$/d" \
  -e "  s/${RECORD}Job '([^']+)' submitted successfully\$/Job '\\3' submitted: ray job logs \\3 | ray job stop \\3/" \
  -e "  t" \
  -e "  /${RECORD}Job '[^']+' succeeded\$/{ s/${RECORD}//; b; }" \
  -e "  /[[:space:]](WARNING|ERROR) cli\\.py:/{ s/${RECORD}//; b; }" \
  -e "  d" \
  -e "}" \
  -e "/^Running entrypoint for job /d" \
  -e "/^\$/d" &
rc=0
wait %1 || rc=$?
[ "$rc" -le 128 ] || wait || true  # a trapped signal ended the first wait: reap the CLI
exit "$rc"
