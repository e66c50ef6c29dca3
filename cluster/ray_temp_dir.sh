# Sourced by start_head.sh and start_worker.sh: picks the node's Ray temp dir (RAY_TEMP_DIR).
# Ray keeps its Unix sockets under it, and a socket path holds at most 107 bytes: under a batch scheduler's
# long per-job TMPDIR (over 35 bytes), `ray start` fails with a traceback. Such a node keeps its Ray session
# in /tmp/ray-<uid> instead (the rule of a local `pipeline train`: local_ray_temp_dir in pipeline/train/launch.py,
# which derives the 35); RAY_TEMP_DIR or RAY_TMPDIR choose.
if [ -z "${RAY_TEMP_DIR:-}" ] && [ -z "${RAY_TMPDIR:-}" ]; then
  _tmp="${TMPDIR:-/tmp}"
  if [ "${#_tmp}" -gt 35 ]; then
    RAY_TEMP_DIR="/tmp/ray-$(id -u)"
    echo "TMPDIR is too long for Ray's socket paths (at most 35 bytes): this node keeps its Ray session in ${RAY_TEMP_DIR} (RAY_TEMP_DIR chooses another)" >&2
  fi
  unset _tmp
fi
