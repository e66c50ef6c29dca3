# Sourced by start_head.sh and start_worker.sh: picks the node's Ray temp dir (RAY_TEMP_DIR).
# Ray keeps its Unix sockets under it, and a socket path holds at most 107 bytes, which leaves 39 bytes for
# the temp dir `ray start --temp-dir` takes, and 35 for a RAY_TMPDIR or TMPDIR (Ray adds "/ray"); a longer one
# makes `ray start` fail with a traceback. Under a batch scheduler's long per-job TMPDIR the node keeps its Ray
# session in /tmp/ray-<uid> instead (the rule of a local `pipeline train`: local_ray_temp_dir in
# pipeline/train/launch.py, which derives these numbers); a RAY_TEMP_DIR or RAY_TMPDIR that is too long is the
# user's own choice: one error line, exit code 2.
_room=39  # bytes for `--temp-dir`: 107 - the longest socket tail; RAY_TMPDIR and TMPDIR get 4 fewer ("/ray")
_bytes() { printf %s "$1" | wc -c; }
_too_long() {  # NAME LIMIT: the line and the exit code for a temp dir the user chose
  echo "error: $1 is $(_bytes "${!1}") bytes long, too long for Ray's socket paths (at most $2 bytes):" \
    "set a shorter $1 (${!1})" >&2
  exit 2
}
if [ -n "${RAY_TEMP_DIR:-}" ]; then
  [ "$(_bytes "$RAY_TEMP_DIR")" -le "$_room" ] || _too_long RAY_TEMP_DIR "$_room"
elif [ -n "${RAY_TMPDIR:-}" ]; then
  [ "$(_bytes "$RAY_TMPDIR")" -le $((_room - 4)) ] || _too_long RAY_TMPDIR $((_room - 4))
elif [ "$(_bytes "${TMPDIR:-/tmp}")" -gt $((_room - 4)) ]; then
  RAY_TEMP_DIR="/tmp/ray-$(id -u)"
  echo "TMPDIR is too long for Ray's socket paths (at most $((_room - 4)) bytes): this node keeps its Ray session in" \
    "${RAY_TEMP_DIR} (RAY_TEMP_DIR chooses another)" >&2
fi
unset -f _bytes _too_long
unset _room
