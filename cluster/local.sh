#!/usr/bin/env bash
# A multi-node Ray cluster on one machine: a head on 127.0.0.2 and workers on 127.0.0.3, 127.0.0.4, …
# (Linux routes all of 127.0.0.0/8 to loopback, so each address is a node of its own to Ray and Ray Train;
# 127.0.0.1 itself is not used because `ray start` swaps it for the machine's network address).
#
#   cluster/local.sh up 3 [--cpus 1] [--head-cpus 0]
#                                      # head + 2 worker nodes, 1 CPU each (head: 0, so training and shard
#                                      # tasks run on the workers only); prints the exports for clients
#   cluster/local.sh env               # those exports again: eval "$(cluster/local.sh env)"
#   cluster/local.sh kill 2            # SIGKILL every process of node 2 (0 is the head): a lost machine
#   cluster/local.sh start 2           # node 2 joins again
#   cluster/local.sh stop 2            # node 2 leaves cleanly (SIGTERM)
#   cluster/local.sh down              # stop exactly the nodes started here, nothing else
#
# Every node runs `ray start --block` through start_head.sh / start_worker.sh, on free ports of its own,
# with a Ray temp dir of its own (nodes sharing one would share, and delete, each other's job working
# directories) under the state directory ($PIPELINE_LOCAL_CLUSTER, default /tmp/pipeline-local-UID;
# keep it short: Ray's socket paths are limited to ~100 characters). It never runs `ray stop`, which
# kills every Ray process of the user on the host, and leaves no /tmp/ray/ray_current_cluster behind
# for a later plain ray.init() to join.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
STATE="${PIPELINE_LOCAL_CLUSTER:-/tmp/pipeline-local-$(id -u)}"
PY="$(dirname "$(command -v ray)")/python"
[ -x "$PY" ] || PY=python3

die() { echo "local.sh: $*" >&2; exit 2; }
# Several nodes share this machine's cores: give a node's agents time to start when it is busy.
export RAY_agent_register_timeout_ms="${RAY_agent_register_timeout_ms:-300000}"
export RAY_raylet_start_wait_time_s="${RAY_raylet_start_wait_time_s:-300}"
free_ports() { "$PY" -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("", 0))  # free on every address: nodes bind some ports on all of them
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"; }
node_ip() { echo "127.0.0.$(( $1 + 2 ))"; }

tree() {  # the pid and all its descendants, read from /proc
  local pids="$1" todo="$1" next p
  while [ -n "$todo" ]; do
    next=""
    for p in $todo; do next="$next $(ps -o pid= --ppid "$p" 2>/dev/null | tr '\n' ' ')"; done
    todo="$(echo $next)"
    pids="$pids $todo"
  done
  echo $pids
}

start_node() {  # start_node I [PORT…]: 7 ports for the node (+2 for the head), else fresh ones
  local i="$1" cpus ip p
  shift
  cpus="$(cat "$STATE/cpus")"
  [ "$i" = 0 ] && cpus="$(cat "$STATE/head_cpus")"
  ip="$(node_ip "$i")"
  if [ $# -ge 7 ]; then p=("$@"); else read -r -a p <<<"$(free_ports 9)"; fi
  local common=(--block --num-gpus 0 --node-manager-port "${p[0]}" --object-manager-port "${p[1]}"
                --dashboard-agent-listen-port "${p[2]}" --dashboard-agent-grpc-port "${p[3]}"
                --runtime-env-agent-port "${p[4]}" --metrics-export-port "${p[5]}")
  if [ "$i" = 0 ]; then
    gcs="${p[7]}"; dash="${p[8]}"
    echo "$gcs" >"$STATE/gcs_port"; echo "$dash" >"$STATE/dashboard_port"
    RAY_BIND="$ip" RAY_GCS_PORT="$gcs" RAY_DASHBOARD_PORT="$dash" RAY_NUM_CPUS="$cpus" RAY_TEMP_DIR="$STATE/n$i" \
      setsid "$HERE/start_head.sh" "${common[@]}" --ray-client-server-port "${p[6]}" \
      >"$STATE/node-$i.log" 2>&1 </dev/null &
  else
    RAY_BIND="$ip" RAY_NUM_CPUS="$cpus" RAY_TEMP_DIR="$STATE/n$i" \
      setsid "$HERE/start_worker.sh" "$(node_ip 0):$(cat "$STATE/gcs_port")" "${common[@]}" \
      >"$STATE/node-$i.log" 2>&1 </dev/null &
  fi
  echo $! >"$STATE/node-$i.pid"
}

wait_nodes() {  # until N nodes are alive (or a node's start failed)
  local want="$1" deadline=$(( $(date +%s) + ${PIPELINE_LOCAL_TIMEOUT:-240} ))
  until [ "$(alive)" -ge "$want" ] 2>/dev/null; do
    [ "$(date +%s)" -lt "$deadline" ] || die "only $(alive) of $want nodes came up; logs: $STATE/node-*.log"
    for f in "$STATE"/node-*.pid; do
      kill -0 "$(cat "$f")" 2>/dev/null || die "$(basename "$f" .pid) exited: $(tail -5 "${f%.pid}.log")"
    done
    sleep 2
  done
}

alive() {  # alive [IP]: the number of alive nodes, or the ids of the alive nodes at IP
  RAY_AUTH_MODE=token "$PY" - "$(node_ip 0):$(cat "$STATE/gcs_port")" "${1:-}" <<'PYEOF' 2>/dev/null || echo 0
import sys
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = [n for n in ray.nodes() if n["Alive"]]
if sys.argv[2]:
    print(" ".join(sorted(n["NodeID"] for n in nodes if n["NodeManagerAddress"] == sys.argv[2])))
else:
    print(len(nodes))
PYEOF
}

wait_rejoined() {  # wait_rejoined I IDS: until node I is alive under an id not in IDS (the lost one may linger)
  local ip deadline=$(( $(date +%s) + ${PIPELINE_LOCAL_TIMEOUT:-240} )) id
  ip="$(node_ip "$1")"
  while :; do
    for id in $(alive "$ip"); do
      case " $2 " in *" $id "*) ;; *) return 0 ;; esac
    done
    [ "$(date +%s)" -lt "$deadline" ] || die "node $1 did not rejoin; log: $STATE/node-$1.log"
    kill -0 "$(cat "$STATE/node-$1.pid")" 2>/dev/null || die "node $1 exited: $(tail -5 "$STATE/node-$1.log")"
    sleep 2
  done
}

print_env() {
  echo "export RAY_AUTH_MODE=token"
  echo "export RAY_ADDRESS=$(node_ip 0):$(cat "$STATE/gcs_port")"
  echo "export RAY_DASHBOARD=http://$(node_ip 0):$(cat "$STATE/dashboard_port")"
}

stop_node() {  # stop_node I SIGNAL: the node's recorded pid and everything below it
  local i="$1" sig="$2" pid pids
  [ -f "$STATE/node-$i.pid" ] || return 0
  pid="$(cat "$STATE/node-$i.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    pids="$(tree "$pid")"
    kill "-$sig" $pids 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 $pids 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL $pids 2>/dev/null || true
  fi
  rm -f "$STATE/node-$i.pid"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  up)
    [ $# -ge 1 ] || die "usage: local.sh up N [--cpus C]"
    n="$1"; shift; cpus=1; head_cpus=""
    while [ $# -gt 0 ]; do
      case "$1" in
        --cpus) cpus="$2"; shift 2 ;;
        --head-cpus) head_cpus="$2"; shift 2 ;;
        *) die "unknown option $1" ;;
      esac
    done
    [ "$n" -ge 1 ] 2>/dev/null || die "N must be >= 1"
    ls "$STATE"/node-*.pid >/dev/null 2>&1 && die "a cluster is already up in $STATE (local.sh down first)"
    mkdir -p "$STATE"
    echo "$cpus" >"$STATE/cpus"; echo "${head_cpus:-$cpus}" >"$STATE/head_cpus"
    # All ports in one go: ports picked one node at a time could repeat before the first node binds them.
    read -r -a ports <<<"$(free_ports $(( 9 * n )))"
    start_node 0 "${ports[@]:0:9}"
    wait_nodes 1
    for i in $(seq 1 $(( n - 1 ))); do start_node "$i" "${ports[@]:$(( 9 * i )):9}"; done
    wait_nodes "$n"
    echo "local cluster: $n node(s) on $(node_ip 0)..$(node_ip $(( n - 1 ))), $cpus CPU(s) per worker node, ${head_cpus:-$cpus} on the head; state in $STATE"
    print_env
    ;;
  env) print_env ;;
  kill)
    [ "${1:-}" ] || die "usage: local.sh kill I"
    stop_node "$1" KILL
    ;;
  stop)
    [ "${1:-}" ] || die "usage: local.sh stop I"
    stop_node "$1" TERM
    ;;
  start)
    [ "${1:-}" ] || die "usage: local.sh start I"
    [ -f "$STATE/node-$1.pid" ] && die "node $1 is running"
    before="$(alive "$(node_ip "$1")")"
    start_node "$1"
    wait_rejoined "$1" "$before"
    ;;
  down)
    for f in "$STATE"/node-*.pid; do
      [ -e "$f" ] || continue
      i="${f##*/node-}"; i="${i%.pid}"
      [ "$i" = 0 ] || stop_node "$i" TERM
    done
    stop_node 0 TERM
    rm -rf "$STATE"/n[0-9]*  # the nodes' Ray temp dirs, with their ray_current_cluster files
    ;;
  *) die "usage: local.sh up N [--cpus C] [--head-cpus C] | env | kill I | stop I | start I | down" ;;
esac
