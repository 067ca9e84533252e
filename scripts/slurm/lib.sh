# shellcheck shell=bash
# Shared helpers of train.sbatch and ray_node.sh (sourced, never executed).
# Settings come from GM_* environment variables (see docs/slurm.md); submit.sh sets them.

# shellcheck disable=SC2034  # used by the scripts that source this file
EXIT_PREEMPTED=75   # payload protocol: checkpoint saved after SIGUSR1/SIGTERM, run me again

gm_log() { printf '[gm-slurm %s %s] %s\n' "$(date +%H:%M:%S)" "${SLURMD_NODENAME:-$(hostname -s)}" "$*"; }
gm_die() { gm_log "ERROR: $*" >&2; exit "${GM_DIE_CODE:-1}"; }

# Name of this SLURM node (emulated nodes share a hostname, so prefer slurmd's name).
gm_node_name() { printf '%s\n' "${SLURMD_NODENAME:-$(hostname -s)}"; }

# All node names of the job, one per line, in allocation order (the first hosts the Ray head).
gm_job_nodes() { scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a SLURM job}"; }

# Index of a node in the job's node list (0 for the head); used to spread per-node ports.
gm_node_index() {
  local i=0 n
  while read -r n; do
    [ "$n" = "$1" ] && { echo "$i"; return 0; }
    i=$((i + 1))
  done < <(gm_job_nodes)
  echo 0
}

# Ports of this job: one block of 32 per job id, so jobs sharing a node do not collide.
#   base+0 GCS, +1 dashboard, +2 Ray client server, +16+k dashboard agent of node k.
gm_port_base() { echo "${GM_PORT_BASE:-$((20000 + (${SLURM_JOB_ID:-0} % 1000) * 32))}"; }

# Replace the calling (sub)shell by a command inside the job's container on this node, so
# signals sent to a `gm_container_exec ... &` PID reach the command itself. pyxis steps are
# already inside the container (srun --container-image), bare metal needs nothing;
# Apptainer wraps the command.
gm_container_exec() {
  case "${GM_CONTAINER:-none}" in
    none | pyxis) exec "$@" ;;
    apptainer)
      local args=(exec)
      [ "${GM_GPUS_PER_NODE:-0}" -gt 0 ] && args+=(--nv)
      args+=(--bind "$(gm_container_mounts)")
      exec "${GM_APPTAINER:-apptainer}" "${args[@]}" "${GM_IMAGE:?GM_IMAGE (container image) is not set}" "$@"
      ;;
    *) gm_die "GM_CONTAINER must be none, pyxis or apptainer (got '${GM_CONTAINER}')" ;;
  esac
}

# Host paths the container must see: the repository, the job's temp dir, the submit dir and
# any user mounts (GM_CONTAINER_MOUNTS=src:dst[,src:dst...]).
gm_container_mounts() {
  local m="${GM_REPO}:${GM_REPO},${GM_JOB_DIR}:${GM_JOB_DIR}"
  [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ "${SLURM_SUBMIT_DIR}" != "${GM_REPO}" ] && m+=",${SLURM_SUBMIT_DIR}:${SLURM_SUBMIT_DIR}"
  [ -n "${GM_CONTAINER_MOUNTS:-}" ] && m+=",${GM_CONTAINER_MOUNTS}"
  printf '%s\n' "$m"
}

# srun options that put a step into the pyxis container (empty otherwise). One named
# container per job: later steps reuse the imported image instead of unpacking it again.
gm_srun_container_args() {
  [ "${GM_CONTAINER:-none}" = pyxis ] || return 0
  printf '%s\n' "--container-image=${GM_IMAGE:?GM_IMAGE (container image) is not set}" \
    "--container-name=gm-${SLURM_JOB_ID}" "--container-mounts=$(gm_container_mounts)" \
    "--container-workdir=${PWD}" "--no-container-mount-home"
}

# Wait for a background child; a trapped signal interrupts `wait` with 128+n while the child
# runs on, so wait again until the child is really gone. Returns the child's exit code.
gm_wait() {
  local pid=$1 rc again
  while :; do
    wait "$pid"; rc=$?
    if [ "$rc" -gt 128 ]; then
      kill -0 "$pid" 2>/dev/null && continue
      wait "$pid" 2>/dev/null; again=$?
      [ "$again" -ne 127 ] && rc=$again
    fi
    return "$rc"
  done
}

# Wait up to $2 seconds for process $1 to exit; returns 1 if it is still running.
gm_wait_gone() {
  local pid=$1 deadline=$((SECONDS + $2))
  while kill -0 "$pid" 2>/dev/null; do
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 0.2
  done
  return 0
}

# Memory of this job on each node in MiB, from SLURM's allocation (empty when SLURM does not
# track memory: SelectTypeParameters without _Memory and no --mem).
gm_allocated_mb() {
  if [ -n "${SLURM_MEM_PER_NODE:-}" ] && [ "${SLURM_MEM_PER_NODE}" -gt 0 ] 2>/dev/null; then
    echo "$SLURM_MEM_PER_NODE"
  elif [ -n "${SLURM_MEM_PER_CPU:-}" ] && [ "${SLURM_MEM_PER_CPU}" -gt 0 ] 2>/dev/null; then
    echo $((SLURM_MEM_PER_CPU * ${SLURM_CPUS_ON_NODE:-1}))
  else
    gm_tres_mem_mb_per_node   # --mem=0 (the whole node): SLURM sets no variable, its TRES has the amount
  fi
}

# The job's allocated memory from `scontrol show job` (TRES=...,mem=4G,node=2,...), per node, MiB.
gm_tres_mem_mb_per_node() {
  local tres mem nodes value unit
  tres=$(scontrol show job -o "${SLURM_JOB_ID:?}" 2>/dev/null | grep -o ' TRES=[^ ]*' | head -n1)
  mem=$(grep -o 'mem=[0-9.]*[KMGT]\?' <<<"$tres" | head -n1); mem=${mem#mem=}
  nodes=$(grep -o 'node=[0-9]*' <<<"$tres" | head -n1); nodes=${nodes#node=}
  [ -n "$mem" ] && [ -n "$nodes" ] && [ "$nodes" -gt 0 ] || return 0
  value=${mem%[KMGT]}; unit=${mem#"$value"}
  awk -v v="$value" -v u="${unit:-M}" -v n="$nodes" 'BEGIN {
    f = (u == "K") ? 1 / 1024 : (u == "G") ? 1024 : (u == "T") ? 1048576 : 1
    mb = int(v * f / n); if (mb > 0) print mb }'
}

# Ray must not advertise more memory than SLURM gave the job (a site that enforces the limit
# kills the job otherwise): object store 30 % and task memory 60 % of the allocation, unless
# GM_RAY_OBJECT_STORE_BYTES / GM_RAY_MEMORY_BYTES are set.
gm_ray_memory_from_allocation() {
  local mb; mb=$(gm_allocated_mb)
  if [ -z "$mb" ]; then
    gm_log "Ray memory: SLURM allocates no memory limit here; Ray sizes itself from the host"
    return 0
  fi
  local bytes=$((mb * 1024 * 1024))
  export GM_RAY_OBJECT_STORE_BYTES=${GM_RAY_OBJECT_STORE_BYTES:-$((bytes * 3 / 10))}
  export GM_RAY_MEMORY_BYTES=${GM_RAY_MEMORY_BYTES:-$((bytes * 6 / 10))}
  gm_log "Ray memory follows the allocation of ${mb} MiB per node: object store ${GM_RAY_OBJECT_STORE_BYTES} B, task memory ${GM_RAY_MEMORY_BYTES} B"
}

# True when SLURM itself is requeueing this job (an external `scontrol requeue`, preemption
# with PreemptMode=REQUEUE): SLURM counts the restart as soon as it requeues, while this run
# (SLURM_RESTART_COUNT) is still ending.
gm_requeued_by_slurm() {
  local restarts
  restarts=$(scontrol show job -o "${SLURM_JOB_ID:?}" 2>/dev/null | grep -o 'Restarts=[0-9]*' | head -n1)
  restarts=${restarts#Restarts=}
  [ -n "$restarts" ] && [ "$restarts" -gt "${SLURM_RESTART_COUNT:-0}" ]
}
