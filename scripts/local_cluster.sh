#!/usr/bin/env bash
# A multi-node Ray cluster on this machine that behaves like separate machines, plus an S3
# endpoint. Everything runs in a private network namespace with only a loopback interface: Ray's
# servers listen on all interfaces, and there "all" is 127.0.0.1, reachable from nothing outside.
# A head (no CPUs) and worker nodes started with `ray start`, token auth on. Each node has its own
# HOME, TMPDIR, --temp-dir and ports and runs in its own mount namespace where the other nodes'
# folders (and, on a worker node, the driver's folder) are hidden under an empty tmpfs: what one
# node writes to its disk no other node sees, so object storage is the only thing they share.
# Needs root (unshare, nsenter, mount) and `ray`, `python` (with moto[server] and boto3) on PATH.
#
#   scripts/local_cluster.sh start DIR        head + worker nodes a, b + moto_server; writes DIR/cluster.env
#   scripts/local_cluster.sh exec DIR CMD...  run CMD on the "head machine": in the cluster's network, with the
#                                             head's view of the disks, DIR/cluster.env set
#   scripts/local_cluster.sh add-node DIR N   one more worker node (N: c or d)
#   scripts/local_cluster.sh kill-node DIR N  SIGKILL every process of node N (raylet, workers): a node loss
#   scripts/local_cluster.sh stop DIR         stop every process started in DIR (by session id, never `ray stop`)
#
# For example (after `set -a; . DIR/cluster.env; set +a`; DIR/driver is a folder no worker node sees):
#   scripts/local_cluster.sh exec DIR ray job submit --working-dir . -- jobs/smoke.yaml \
#       --set ray.storage_path=s3://paf/runs
#   scripts/local_cluster.sh exec DIR paf-ray submit jobs/smoke.yaml --address $RAY_API_SERVER_ADDRESS --wait
#   scripts/local_cluster.sh exec DIR sh -c "cd DIR/driver && paf-ray run CFG --set ray.address=$LOCAL_CLUSTER_GCS"
#   scripts/local_cluster.sh exec DIR bash     # a shell on the "head machine"
#
# Settings (environment): LOCAL_CLUSTER_WORKER_CPUS (logical CPUs per worker node, default 2),
# LOCAL_CLUSTER_STORE_MB (object store per node, default 200), LOCAL_CLUSTER_HIDE (more folders
# to hide from the worker nodes, space-separated), PYTHONPATH (passed to every node and client:
# where paf_ray is, when it is not installed).
set -euo pipefail

NODE_SLOTS=(a b c d)  # worker node names; node k uses port slot k, the head slot 0
HEAD_PORT=20000       # slot k: ports 20000 + 200k + (0..9), its Ray workers 20000 + 200k + (100..199),
SLOT_PORTS=200        # clear of Ray's defaults (6379, 8265, 10001) as Ray requires
S3_PORT=20009

usage() { awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0" >&2; exit 2; }
die() { echo "local_cluster.sh: $*" >&2; exit 1; }

[ $# -ge 2 ] || usage
cmd=$1
dir=$(realpath -m "$2")
env_file="$dir/cluster.env"

load_env() {
    [ -f "$env_file" ] || die "$env_file: no cluster started in $dir"
    set -a
    # shellcheck disable=SC1090
    . "$env_file"
    set +a
    netns=(nsenter --net="/proc/$(cat "$dir/net.sid")/ns/net")
}

slot_of() {
    local i
    for i in "${!NODE_SLOTS[@]}"; do
        [ "${NODE_SLOTS[$i]}" = "$1" ] && { echo $((i + 1)); return; }
    done
    die "unknown node name $1 (one of: ${NODE_SLOTS[*]})"
}

# `setsid CMD &` from a script: setsid execs in place (the script's job is no group leader), and
# so do nsenter, unshare and `sh -c "... exec"`: $! is the id of the session of everything CMD
# starts (Ray's daemons and worker processes), saved in DIR/NAME.sid.
# `ray start` gives a node 30 s (fixed in Ray) to register; on a loaded machine that can pass:
# then the node's processes are stopped and it is started again, up to 3 times.
launch() {  # launch NAME CMD...: run `ray start ...` (CMD) as node NAME, in its own session
    local name=$1 attempt sid
    shift
    for attempt in 1 2 3; do
        HOME="$dir/$name/home" TMPDIR="$dir/$name/tmp" setsid "$@" >"$dir/$name.log" 2>&1 </dev/null &
        sid=$!
        echo "$sid" >"$dir/$name.sid"
        if wait "$sid"; then
            echo "$name: session $sid"
            return 0
        fi
        echo "$name: start attempt $attempt failed: $(tail -n 1 "$dir/$name.log")" >&2
        kill_group "$name" KILL
    done
    die "$name did not start: $(tail -n 20 "$dir/$name.log")"
}

start_worker() {
    local name=$1 slot p hide mounts="" path
    slot=$(slot_of "$name")
    [ ! -f "$dir/$name.sid" ] || die "node $name already started (session $(cat "$dir/$name.sid"))"
    p=$((HEAD_PORT + slot * SLOT_PORTS))
    hide="$dir/head $dir/driver ${LOCAL_CLUSTER_HIDE:-}"
    for other in "${NODE_SLOTS[@]}"; do [ "$other" = "$name" ] || hide="$hide $dir/$other"; done
    for path in $hide; do mounts="$mounts mount -t tmpfs -o size=1m tmpfs '$path' &&"; done
    mkdir -p "$dir/$name/home" "$dir/$name/tmp"
    launch "$name" "${netns[@]}" unshare -m --propagation private sh -c \
        "$mounts exec ray start --address=127.0.0.1:$HEAD_PORT --node-ip-address=127.0.0.1 \
        --num-cpus=${LOCAL_CLUSTER_WORKER_CPUS:-2} --num-gpus=0 --resources='{\"local_node_$name\": 1}' \
        --object-store-memory=$((${LOCAL_CLUSTER_STORE_MB:-200} * 1048576)) \
        --temp-dir='$dir/$name/ray' --node-manager-port=$p --object-manager-port=$((p + 1)) \
        --dashboard-agent-listen-port=$((p + 2)) --dashboard-agent-grpc-port=$((p + 3)) \
        --metrics-export-port=$((p + 4)) --runtime-env-agent-port=$((p + 5)) \
        --min-worker-port=$((p + 100)) --max-worker-port=$((p + 199)) --disable-usage-stats"
    echo "node $name: ports $p..$((p + SLOT_PORTS - 1))"
}

session_pids() { ps -eo pid=,sid= | awk -v sid="$1" '$2 == sid { print $1 }'; }

# kill_group NAME SIGNAL: every process of the session in DIR/NAME.sid, then wait until none is left.
# (Ray starts its worker processes in process groups of their own, but in the node's session.)
kill_group() {
    local f="$dir/$1.sid" sid pids
    [ -f "$f" ] || return 0
    sid=$(cat "$f")
    pids=$(session_pids "$sid")
    [ -z "$pids" ] || kill "-$2" $pids 2>/dev/null || true
    for _ in $(seq 1 50); do
        pids=$(session_pids "$sid")
        [ -n "$pids" ] || break
        sleep 0.2
    done
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
    rm -f "$f"
}

case "$cmd" in
start)
    [ ! -f "$env_file" ] || die "$env_file exists: stop that cluster first"
    mkdir -p "$dir/head/home" "$dir/head/tmp" "$dir/driver"
    for name in "${NODE_SLOTS[@]}"; do mkdir -p "$dir/$name"; done
    # The network namespace lives as long as this process: a sleep, with the loopback up.
    setsid unshare -n sh -c 'ip link set lo up && exec sleep infinity' </dev/null >/dev/null 2>&1 &
    echo $! >"$dir/net.sid"
    for _ in $(seq 1 50); do
        nsenter --net="/proc/$(cat "$dir/net.sid")/ns/net" ip -o link show lo 2>/dev/null | grep -q UP && break
        sleep 0.1
    done
    {
        echo "RAY_AUTH_MODE=token"
        echo "RAY_AUTH_TOKEN=$(python -c "import secrets; print(secrets.token_hex(32))")"
        echo "RAY_API_SERVER_ADDRESS=http://127.0.0.1:$((HEAD_PORT + 1))"
        echo "LOCAL_CLUSTER_GCS=127.0.0.1:$HEAD_PORT"
        echo "RAY_USAGE_STATS_ENABLED=0"
        # A raylet stops when its dashboard agent has not written its ports within this time;
        # a loaded machine can take longer than the default to start that Python process.
        echo "RAY_agent_register_timeout_ms=120000"
        # Every node's memory monitor sees the whole machine's memory (all nodes and everything
        # else running here) and would kill this node's workers for it; the kernel still guards it.
        echo "RAY_memory_monitor_refresh_ms=0"
        echo "AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT"
        echo "AWS_ACCESS_KEY_ID=local"
        echo "AWS_SECRET_ACCESS_KEY=local"
        echo "AWS_DEFAULT_REGION=us-east-1"
    } >"$env_file"
    load_env
    started=0
    trap '[ "$started" = 1 ] || "$0" stop "$dir" >/dev/null 2>&1' EXIT
    setsid "${netns[@]}" python -m moto.server -H 127.0.0.1 -p "$S3_PORT" >"$dir/s3.log" 2>&1 </dev/null &
    echo $! >"$dir/s3.sid"
    hide=""
    for name in "${NODE_SLOTS[@]}"; do hide="$hide mount -t tmpfs -o size=1m tmpfs '$dir/$name' &&"; done
    launch head "${netns[@]}" unshare -m --propagation private sh -c \
        "$hide { sleep infinity </dev/null >/dev/null 2>&1 & echo \$! >'$dir/head.ns'; } && \
        exec ray start --head --node-ip-address=127.0.0.1 \
        --port=$HEAD_PORT --dashboard-host=127.0.0.1 --dashboard-port=$((HEAD_PORT + 1)) --include-dashboard=true \
        --ray-client-server-port=$((HEAD_PORT + 2)) --dashboard-agent-listen-port=$((HEAD_PORT + 3)) \
        --dashboard-agent-grpc-port=$((HEAD_PORT + 4)) --runtime-env-agent-port=$((HEAD_PORT + 5)) \
        --metrics-export-port=$((HEAD_PORT + 6)) --node-manager-port=$((HEAD_PORT + 7)) \
        --object-manager-port=$((HEAD_PORT + 8)) \
        --min-worker-port=$((HEAD_PORT + 100)) --max-worker-port=$((HEAD_PORT + 199)) \
        --num-cpus=0 --num-gpus=0 --object-store-memory=$((${LOCAL_CLUSTER_STORE_MB:-200} * 1048576)) \
        --temp-dir='$dir/head/ray' --disable-usage-stats"
    echo "head: GCS $LOCAL_CLUSTER_GCS, dashboard $RAY_API_SERVER_ADDRESS"
    for name in a b; do start_worker "$name"; done
    "${netns[@]}" python -c '
import time, boto3
deadline = time.monotonic() + 60
while True:
    try:
        boto3.client("s3").create_bucket(Bucket="paf")
        break
    except Exception:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.3)
'
    echo "s3: $AWS_ENDPOINT_URL, bucket s3://paf"
    echo "cluster env: $env_file"
    started=1
    ;;
exec)
    [ $# -ge 3 ] || usage
    load_env
    shift 2
    # The head's view of the disks (the worker nodes' folders hidden), as on the head machine:
    # DIR/head.ns is a sleep that lives in the head's mount namespace as long as the head.
    exec "${netns[@]}" --mount="/proc/$(cat "$dir/head.ns")/ns/mnt" --wd="$PWD" "$@"
    ;;
add-node)
    [ $# -eq 3 ] || usage
    load_env
    start_worker "$3"
    ;;
kill-node)
    [ $# -eq 3 ] || usage
    slot_of "$3" >/dev/null
    kill_group "$3" KILL
    echo "node $3: killed"
    ;;
stop)
    for f in "$dir"/*.sid; do
        [ -e "$f" ] || continue
        name=$(basename "$f" .sid)
        case "$name" in head | s3 | net) ;; *) kill_group "$name" TERM ;; esac
    done
    kill_group head TERM
    kill_group s3 TERM
    kill_group net TERM
    rm -f "$env_file" "$dir/head.ns"
    ;;
*) usage ;;
esac
