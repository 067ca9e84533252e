#!/usr/bin/env bash
# One Ray node of a SLURM job; train.sbatch runs it through srun, one task per node.
#   ray_node.sh head            start the head on this node
#   ray_node.sh worker ADDRESS  join the head at ADDRESS (host:port)
# Runs `ray start --block` in the job's container with a per-job temp dir and ports, tags the
# node with the Ray resource slurm_node_<name> (node ids of Ray, not IPs, identify nodes),
# and on SIGTERM stops exactly the Ray processes it started, then removes its temp dir.
set -uo pipefail
# The preemption signal (USR1) is the payload's business; Ray must not die of it.
# An ignored disposition survives exec, so ray start and its children ignore it too.
trap '' USR1 USR2
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

role=${1:?usage: ray_node.sh head|worker [ADDRESS]}
node=$(gm_node_name)
index=$(gm_node_index "$node")
base=$(gm_port_base)
tmp="${GM_JOB_DIR:?}/ray/${node}"
mkdir -p "$tmp"
# A SIGTERM'd Ray node would otherwise wait up to 30 s to "drain" before stopping.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
# The third-party warnings expected on this node (TE/Apex fallbacks without GPUs, deprecations
# we cannot act on) stay out of every Ray worker's output (grail_megatron/quiet.py).
if filters=$( (gm_container_exec "${GM_PYTHON:-python3}" -m grail_megatron.quiet) 2>/dev/null) && [ -n "$filters" ]; then
  export PYTHONWARNINGS=$filters
fi

args=(
  --block --disable-usage-stats
  --temp-dir "$tmp"
  --num-cpus "${GM_CPUS_PER_NODE:?}" --num-gpus "${GM_GPUS_PER_NODE:-0}"
  --resources "{\"slurm_node_${node}\": 1}"
  --dashboard-agent-listen-port $((base + 16 + index % 16))
)
# Advertise this node's address on the job's socket interface (the one NCCL/GLOO use).
if [ -n "${GM_SOCKET_IFNAME:-}" ] && [ "$GM_SOCKET_IFNAME" != lo ]; then
  read -r _ node_ip < <(gm_container_exec "${GM_PYTHON:-python3}" -m grail_megatron.launch.netif --iface "$GM_SOCKET_IFNAME")
  [ "${node_ip:--}" != - ] && args+=(--node-ip-address "$node_ip")
fi
[ -n "${GM_RAY_OBJECT_STORE_BYTES:-}" ] && args+=(--object-store-memory "$GM_RAY_OBJECT_STORE_BYTES")
[ -n "${GM_RAY_MEMORY_BYTES:-}" ] && args+=(--memory "$GM_RAY_MEMORY_BYTES")
case "$role" in
  head)
    args+=(--head --port "$base" --dashboard-port $((base + 1)) --ray-client-server-port $((base + 2)))
    if [ "${GM_RAY_DASHBOARD:-0}" = 1 ]; then args+=(--include-dashboard=true --dashboard-host=0.0.0.0)
    else args+=(--include-dashboard=false); fi
    ;;
  worker) args+=(--address "${2:?worker needs the head address}") ;;
  *) gm_die "unknown role '$role' (head or worker)" ;;
esac

# Ray's own start-up chatter goes to a file; it is shown if Ray dies on its own (or always
# with GM_RAY_VERBOSE=1).
out="$GM_JOB_DIR/ray-${node}.out"
[ "${GM_RAY_VERBOSE:-0}" = 1 ] && out=/dev/stdout
stopping=0 ray_pid=""
trap 'stopping=1; [ -n "$ray_pid" ] && kill -TERM "$ray_pid" 2>/dev/null' TERM INT HUP
# Ray gives a node a fixed 30 s to register with the GCS; on an overloaded node start-up can
# time out. Such a start-up failure (Ray never printed "Ray runtime started") is retried.
attempts=${GM_RAY_START_ATTEMPTS:-3}
for attempt in $(seq 1 "$attempts"); do
  gm_log "starting Ray $role (attempt $attempt/$attempts, temp dir $tmp, CPUs ${GM_CPUS_PER_NODE}, GPUs ${GM_GPUS_PER_NODE:-0})"
  [ "$out" = /dev/stdout ] || : >"$out"
  gm_container_exec "${GM_PYTHON:-python3}" -m ray.scripts.scripts start "${args[@]}" >>"$out" 2>&1 &
  ray_pid=$!
  gm_wait "$ray_pid"
  rc=$?
  [ "$stopping" = 1 ] && break
  gm_log "ERROR: Ray $role exited on its own (exit $rc); its output:"
  [ "$out" != /dev/stdout ] && tail -n 25 "$out" | sed 's/^/    /'
  [ "$rc" = 0 ] && rc=1
  if [ "$out" = /dev/stdout ] || grep -q "Ray runtime started" "$out"; then break; fi
  rm -rf "${tmp:?}"/*
done
if [ "$stopping" = 1 ]; then
  gm_log "Ray $role stopped"
  rc=0
fi
if [ -n "${GM_RAY_LOG_DIR:-}" ] && [ -d "$tmp/session_latest/logs" ]; then
  mkdir -p "$GM_RAY_LOG_DIR" && cp -rL "$tmp/session_latest/logs" "$GM_RAY_LOG_DIR/${node}-run${SLURM_RESTART_COUNT:-0}" 2>/dev/null
fi
rm -rf "$tmp"
[ "$out" != /dev/stdout ] && rm -f "$out"
exit "$rc"
