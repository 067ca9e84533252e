#!/usr/bin/env bash
# Submit GRPO training to SLURM: N nodes, a Ray cluster across them, preemption-safe.
# Prints the job id and the log path. See docs/slurm.md.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

usage() {
  cat <<EOF
usage: scripts/slurm/submit.sh [options] [--] [hydra overrides...]

resources
  -N, --nodes N             nodes (default 1)
  -g, --gpus-per-node G     GPUs per node (default 8; 0 for CPU nodes)
  -c, --cpus-per-node C     CPUs per node (default: the whole node, --exclusive)
      --mem MEM             memory per node (sbatch --mem; default: the whole node (--mem=0) if exclusive,
                            else the partition's default); Ray's memory follows the allocation
  -p, --partition P         partition
  -A, --account A           account
  -q, --qos Q               QOS
  -t, --time T              time limit (e.g. 2-00:00:00)
  -J, --job-name NAME       job name (default grail-megatron)
payload
      --trainer verl|local  verl on GPUs (default), or the local loop (CPU nodes)
      --command CMD         run CMD instead of a trainer (same preemption protocol)
container
      --container none|pyxis|apptainer  (default none = bare metal)
      --image IMAGE         image for pyxis (registry#image:tag or .sqsh) or Apptainer (.sif)
      --mounts SRC:DST,...  extra container mounts
launcher
      --python PATH         python with grail_megatron installed (default: .venv, or python3 in a container)
      --log-dir DIR         where the job log goes (default ./logs/slurm)
      --signal-secs S       preemption warning (USR1) S seconds before the time limit (default 300)
      --max-requeues N      stop requeueing after N runs (default 10)
      --socket-ifname IF    NCCL/GLOO/Ray network interface (default: the default-route interface)
      --ray-wait S          seconds to wait for all Ray nodes (default 300)
      --no-ray              do not start Ray (the local loop does not need it)
      --sbatch-arg ARG      extra sbatch argument, repeatable (e.g. --sbatch-arg=--constraint=h100)
      --no-check            do not run the trainer's checks here before submitting
      --dry-run             check, then print the sbatch command instead of submitting
  -h, --help
Hydra overrides after the options go to the trainer, e.g. data.train_batch_size=256.
Before sbatch (and with --dry-run) the overrides go through "grail-megatron train --check"
on this node: a misspelled preset or key, a bad value or a missing data file stops here.
Exit status: 0 submitted (or dry run ok), 1 a check failed, 2 bad input, 3 broken environment.
EOF
}

nodes=1 gpus=8 cpus="" mem="" partition="" account="" qos="" time_limit="" name=grail-megatron
trainer=verl command="" container=none image="" mounts="" python="" log_dir=logs/slurm
signal_secs=300 max_requeues=10 ifname="" ray_wait=300 ray=1 dry_run=0 check=1 extra=()

need() { [ $# -ge 2 ] && [ -n "$2" ] || { echo "submit.sh: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  opt=$1 val=""
  case "$opt" in --*=*) val=${opt#*=}; opt=${opt%%=*}; set -- "$opt" "$val" "${@:2}" ;; esac
  case "$opt" in
    -N | --nodes) need "$@"; nodes=$2; shift 2 ;;
    -g | --gpus-per-node) need "$@"; gpus=$2; shift 2 ;;
    -c | --cpus-per-node) need "$@"; cpus=$2; shift 2 ;;
    --mem) need "$@"; mem=$2; shift 2 ;;
    -p | --partition) need "$@"; partition=$2; shift 2 ;;
    -A | --account) need "$@"; account=$2; shift 2 ;;
    -q | --qos) need "$@"; qos=$2; shift 2 ;;
    -t | --time) need "$@"; time_limit=$2; shift 2 ;;
    -J | --job-name) need "$@"; name=$2; shift 2 ;;
    --trainer) need "$@"; trainer=$2; shift 2 ;;
    --command) need "$@"; command=$2; trainer="command"; shift 2 ;;
    --container) need "$@"; container=$2; shift 2 ;;
    --image) need "$@"; image=$2; shift 2 ;;
    --mounts) need "$@"; mounts=$2; shift 2 ;;
    --python) need "$@"; python=$2; shift 2 ;;
    --log-dir) need "$@"; log_dir=$2; shift 2 ;;
    --signal-secs) need "$@"; signal_secs=$2; shift 2 ;;
    --max-requeues) need "$@"; max_requeues=$2; shift 2 ;;
    --socket-ifname) need "$@"; ifname=$2; shift 2 ;;
    --ray-wait) need "$@"; ray_wait=$2; shift 2 ;;
    --no-ray) ray=0; shift ;;
    --sbatch-arg) need "$@"; extra+=("$2"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --no-check) check=0; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "submit.sh: unknown option $opt (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done

fail() { echo "submit.sh: $*" >&2; exit 2; }
is_int() { [[ $2 =~ ^[0-9]+$ ]] || fail "$1 must be a non-negative integer (got '$2')"; }
is_int --nodes "$nodes"; is_int --gpus-per-node "$gpus"; is_int --signal-secs "$signal_secs"
is_int --max-requeues "$max_requeues"; is_int --ray-wait "$ray_wait"
[ "$nodes" -ge 1 ] || fail "--nodes must be >= 1"
[ -z "$cpus" ] || is_int --cpus-per-node "$cpus"
case "$trainer" in verl | local | command) ;; *) fail "--trainer must be verl or local (got '$trainer')" ;; esac
[ "$trainer" != verl ] || [ "$gpus" -gt 0 ] || fail "verl needs GPUs: use --gpus-per-node G, or --trainer local on CPU nodes"
case "$container" in
  none) [ -z "$image" ] || fail "--image given but --container none; choose --container pyxis or apptainer" ;;
  pyxis | apptainer) [ -n "$image" ] || fail "--container $container needs --image" ;;
  *) fail "--container must be none, pyxis or apptainer (got '$container')" ;;
esac

log_dir=$(realpath -m "$log_dir")   # created only for a real submission
sbatch_args=(
  --parsable --job-name="$name" --nodes="$nodes" --ntasks-per-node=1
  --output="$log_dir/%x-%j.log" --open-mode=append --requeue --signal="B:USR1@${signal_secs}"
)
[ "$gpus" -gt 0 ] && sbatch_args+=(--gpus-per-node="$gpus")
if [ -n "$cpus" ]; then sbatch_args+=(--cpus-per-task="$cpus"); else sbatch_args+=(--exclusive); fi
# --exclusive alone gets the partition's default memory (DefMemPerNode), not the node's:
# ask for the whole node's memory (--mem=0) unless the user chose an amount.
if [ -n "$mem" ]; then sbatch_args+=(--mem="$mem"); elif [ -z "$cpus" ]; then sbatch_args+=(--mem=0); fi
[ -n "$partition" ] && sbatch_args+=(--partition="$partition")
[ -n "$account" ] && sbatch_args+=(--account="$account")
[ -n "$qos" ] && sbatch_args+=(--qos="$qos")
[ -n "$time_limit" ] && sbatch_args+=(--time="$time_limit")
sbatch_args+=("${extra[@]}")

# Settings reach the batch script through the environment (sbatch exports it); script
# arguments (the Hydra overrides) survive requeues unchanged.
export GM_REPO=$repo GM_TRAINER=$trainer GM_CONTAINER=$container GM_IMAGE=$image
export GM_CONTAINER_MOUNTS=$mounts GM_GPUS_PER_NODE=$gpus GM_MAX_REQUEUES=$max_requeues
export GM_RAY=$ray GM_RAY_WAIT_S=$ray_wait GM_SIGNAL_SECS=$signal_secs
[ -n "$command" ] && export GM_COMMAND=$command
[ -n "$python" ] && export GM_PYTHON=$python
[ -n "$ifname" ] && export GM_SOCKET_IFNAME=$ifname
[ -n "$cpus" ] && export GM_CPUS_PER_NODE=$cpus

# The trainer's own checks, here on the login node, before anything is queued.
check_payload() {
  [ "$check" = 1 ] || return 0
  [ "$trainer" != command ] || return 0
  local py=${python:-}
  if [ -z "$py" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then py=$repo/.venv/bin/python; else py=python3; fi
  fi
  if ! "$py" -c 'import grail_megatron' 2>/dev/null; then
    [ "$container" != none ] || { echo "submit.sh: $py cannot import grail_megatron (use --python PATH, or --no-check)" >&2; exit 3; }
    echo "submit.sh: not checking the overrides here ($py lacks grail_megatron; --python PATH checks them)" >&2
    return 0
  fi
  local args=(--check)
  if [ "$trainer" = local ]; then args+=(--local); else args+=("trainer.nnodes=$nodes" "trainer.n_gpus_per_node=$gpus"); fi
  local rc=0
  "$py" -m grail_megatron.cli train "${args[@]}" "$@" >/dev/null || rc=$?
  [ "$rc" = 0 ] || { echo "submit.sh: not submitted: the trainer's checks failed (exit $rc, reasons above)" >&2; exit "$rc"; }
}
check_payload "$@"

if [ "$dry_run" = 1 ]; then
  printf 'GM_%s\n' "TRAINER=$trainer" "CONTAINER=$container" "IMAGE=$image" "GPUS_PER_NODE=$gpus" "RAY=$ray"
  printf '%q ' sbatch "${sbatch_args[@]}" "$here/train.sbatch" "$@"; echo
  exit 0
fi
mkdir -p "$log_dir"
out=$(sbatch "${sbatch_args[@]}" "$here/train.sbatch" "$@")
job=${out%%;*}
echo "submitted job $job"
echo "log: $log_dir/$name-$job.log"
