#!/usr/bin/env bash
# Self-test of grail-megatron on a GPU node, in the CUDA image or on a bare node.
#
#   docker run --rm --gpus all --ipc=host grail-megatron:cu13 bash scripts/gpu_selftest.sh   # image, >= 2 GPUs
#   scripts/gpu_selftest.sh --bare --wheelhouse DIR      # any node with a CUDA build of torch, 1 GPU, offline
#   scripts/gpu_selftest.sh --cpu | --bare --cpu [--wheelhouse DIR]                         # no GPU (CI)
#
# Every check prints `PASS <check>`, `FAIL <check>` or `SKIP <check>: <reason>` (with the
# sub-results of the helpers in docker/selftest/ indented below it), keeps its log under
# $GRAIL_SELFTEST_DIR/logs, and is recorded in $GRAIL_SELFTEST_DIR/report.json. The exit status
# is the number of failed checks (0 = nothing failed).
#
# Image checks, in order:
#   gpus            torch sees >= GRAIL_SELFTEST_GPUS CUDA devices
#   kernels         TE, Apex (C++/CUDA extensions), flash-attn, Megatron's fused kernels, patches/
#   tiny_model      a tiny random-init Qwen2 + tokenizer (configs/model_preset/tiny.yaml sizes)
#   tp2_te_vs_local TP2 forward: Transformer Engine layer spec vs local spec vs Hugging Face
#   data            GSM8K fixture parquet files (grail-megatron prepare-data --source fixtures)
#   grpo_2_steps    two GRPO steps through verl 0.9.1 (grail-megatron train): vLLM rollout, verl's
#                   Megatron engine on the mbridge path (vanilla_mbridge=true), trainer mode
#                   grail_megatron with verl's sync semantics, distributed optimizer on
#   grpo_2_steps_no_dist_optim   the same with use_distributed_optimizer=false
#   convert_to_hf   the step-2 checkpoint to a Hugging Face folder, logits verified (convert to-hf)
#   hf_export       the converted folder loads in transformers and generates with vLLM
#
# Bare checks (--bare; one GPU; at most 10 minutes):
#   install         the wheelhouse (scripts/make_wheelhouse.sh) into a private prefix with pip
#                   --no-index --require-hashes; the node's torch stays where it is, untouched
#   cuda            CUDA, NCCL (a one-rank group) and bf16 on the GPU
#   components      which of Transformer Engine, Apex, flash-attn, vLLM are installed; their
#                   kernel checks run if present, the checks that need an absent one are SKIP
#   tiny_model      as above
#   megatron_cuda_vs_cpu  forward/backward of the tiny Qwen2 at TP1 through our bridge on CUDA
#                   against the CPU result of the same weights (logits 1e-4, loss 1e-5, gradients
#                   1e-3 relative); none of the CPU adjustments active on CUDA
#   data            as above
#   grpo_config     the bare GRPO run's overrides through `grail-megatron train --dry-run`
#   grpo_2_steps    two GRPO steps through verl on the one GPU (HF rollout, or vLLM if installed;
#                   vanilla_mbridge=true, trainer mode grail_megatron, distributed optimizer on)
#   grpo_2_steps_no_dist_optim   the same with use_distributed_optimizer=false
#   convert_to_hf   the GPU-written step-2 checkpoint converted to HF on the CPU, with --verify
#   hf_export       the converted folder loads in transformers (and generates with vLLM if present)
#   throughput      the actor's update on verl's Megatron engine (LocalPolicy.update_actor) of a
#                   random-init Qwen2.5-1.5B-shaped model, bf16, seq 2048: tokens/s and model
#                   FLOPs utilisation against the GPU's peak (benchmarks/actor_throughput.py)
#   time_budget     the bare run took at most GRAIL_SELFTEST_BUDGET_S (600) seconds
#
# The GPU part is verified by users on GPU nodes, not in CI (CI has no GPU). `--cpu` runs the
# same script without a GPU, as tests/container does: the image mode runs tiny_model, a TP2
# forward with the local spec on both sides (gloo) and data; `--bare --cpu` runs every bare
# check with the GPU checks reported as SKIP (the CPU halves of megatron_cuda_vs_cpu and
# throughput still run). `--print-grpo-overrides [true|false]` prints the Hydra overrides of
# grpo_2_steps (false: of grpo_2_steps_no_dist_optim); with --bare, those of the bare run.
#
# Environment: GRAIL_SELFTEST_DIR (work dir, default: a new temp dir), GRAIL_SELFTEST_GPUS (2),
# GRAIL_SELFTEST_ONLY (comma-separated subset of checks), PYTHON (image: the venv's python;
# bare: the node's python with its torch, default python3), GRAIL_SELFTEST_BUDGET_S (600),
# GRAIL_SELFTEST_GRPO_TIMEOUT_S (420 per GRPO run), GRAIL_GPU_PEAK_TFLOPS (peak of a GPU the
# throughput table does not know).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HELPERS="${ROOT}/docker/selftest"
NPROC="${GRAIL_SELFTEST_GPUS:-2}"
ONLY="${GRAIL_SELFTEST_ONLY:-}"
BUDGET_S="${GRAIL_SELFTEST_BUDGET_S:-600}"
GRPO_TIMEOUT_S="${GRAIL_SELFTEST_GRPO_TIMEOUT_S:-420}"
SKIPPED_RC=77  # a helper's "could not run here" (its SKIP line says why)
CHECKS_GPU=(gpus kernels tiny_model tp2_te_vs_local data grpo_2_steps grpo_2_steps_no_dist_optim convert_to_hf hf_export)
CHECKS_CPU=(tiny_model tp2_local_vs_local data)
CHECKS_BARE=(install cuda components tiny_model megatron_cuda_vs_cpu data grpo_config grpo_2_steps
             grpo_2_steps_no_dist_optim convert_to_hf hf_export throughput time_budget)

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

CPU=0 BARE=0 PRINT="" WHEELHOUSE=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --cpu) CPU=1 ;;
    --bare) BARE=1 ;;
    --wheelhouse) [ $# -ge 2 ] || { echo "--wheelhouse needs a directory" >&2; exit 2; }; WHEELHOUSE="$2"; shift ;;
    --wheelhouse=*) WHEELHOUSE="${1#--wheelhouse=}" ;;
    --print-grpo-overrides)
      PRINT=true
      if [ "${2:-}" = true ] || [ "${2:-}" = false ]; then PRINT="$2"; shift; fi ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "${WHEELHOUSE}" ] && [ "${BARE}" = 0 ]; then echo "--wheelhouse goes with --bare" >&2; exit 2; fi
if [ "${BARE}" = 1 ] && [ "${CPU}" = 0 ] && [ -z "${PRINT}" ] && [ -z "${WHEELHOUSE}" ]; then
  echo "--bare needs --wheelhouse DIR (made by scripts/make_wheelhouse.sh on a connected machine)" >&2; exit 2
fi
if [ -n "${WHEELHOUSE}" ]; then WHEELHOUSE="$(cd "${WHEELHOUSE}" 2>/dev/null && pwd)" || {
  echo "--wheelhouse: no such directory" >&2; exit 2; }; fi

if [ "${BARE}" = 1 ]; then
  PYTHON="${PYTHON:-python3}"  # the node's python, with its CUDA build of torch
  NPROC=1
  MODE=$([ "${CPU}" = 1 ] && echo bare-cpu || echo bare)
else
  PYTHON="${PYTHON:-python}"
  MODE=$([ "${CPU}" = 1 ] && echo cpu || echo gpu)
fi
PY="${PYTHON}"  # the python the checks use (bare: the prefix's once installed)

if [ -n "${PRINT}" ]; then
  WORK="${GRAIL_SELFTEST_DIR:-/tmp/grail-selftest}"  # only printed, nothing is created
else
  WORK="${GRAIL_SELFTEST_DIR:-$(mktemp -d -t grail-selftest.XXXXXX)}"
fi
MODEL="${WORK}/tiny_model"
DATA="${WORK}/data/gsm8k"
CKPT="${WORK}/checkpoints"
CKPT_PLAIN="${WORK}/checkpoints_no_dist_optim"
HF_OUT="${WORK}/hf_step2"
PREFIX="${WORK}/prefix"
RESULTS="${WORK}/results"
failures=0
declare -A STATUS=()

# The reporter needs only the standard library: the given python, else the system's python3.
REPORT_PY=""
for c in "${PYTHON}" python3; do
  if "${c}" -c 'import json, sys; assert sys.version_info >= (3, 8)' >/dev/null 2>&1; then REPORT_PY="${c}"; break; fi
done

ckpt_of() { if [ "$1" = true ]; then echo "${CKPT}"; else echo "${CKPT_PLAIN}"; fi; }

# The image's two-step GRPO run: the tiny model on the GSM8K fixtures, actor at TP=NPROC, a
# vLLM rollout, a checkpoint after step 2; verl's Megatron engine on the mbridge path, our
# trainer mode (verl's sync semantics), the distributed optimizer as given ($1: true|false).
grpo_overrides() {
  local optim="$1"
  cat <<EOF
model_preset=tiny
dataset=gsm8k
cluster=1x8
actor_rollout_ref.model.path=${MODEL}
data.train_files=[${DATA}/train.parquet]
data.val_files=[${DATA}/val.parquet]
data.train_batch_size=4
data.max_prompt_length=1024
data.max_response_length=32
data.filter_overlong_prompts=True
actor_rollout_ref.rollout.name=vllm
actor_rollout_ref.rollout.n=2
actor_rollout_ref.rollout.tensor_model_parallel_size=1
actor_rollout_ref.rollout.gpu_memory_utilization=0.3
actor_rollout_ref.rollout.enforce_eager=True
actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2
actor_rollout_ref.actor.ppo_mini_batch_size=4
actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2
actor_rollout_ref.actor.megatron.tensor_model_parallel_size=${NPROC}
actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=1
actor_rollout_ref.actor.megatron.vanilla_mbridge=true
actor_rollout_ref.actor.megatron.use_distributed_optimizer=${optim}
actor_rollout_ref.ref.megatron.tensor_model_parallel_size=${NPROC}
actor_rollout_ref.ref.megatron.pipeline_model_parallel_size=1
actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2
trainer.v1.trainer_mode=grail_megatron
trainer.nnodes=1
trainer.n_gpus_per_node=${NPROC}
trainer.total_training_steps=2
trainer.save_freq=2
trainer.test_freq=-1
trainer.val_before_train=False
trainer.logger=[console]
trainer.project_name=grail-selftest
trainer.experiment_name=selftest-dist-optim-${optim}
trainer.default_local_dir=$(ckpt_of "${optim}")
EOF
}

# Is a component present? (the `components` check's facts; absent if it did not run)
has_component() {
  [ -n "${REPORT_PY}" ] && [ -f "${RESULTS}/components.json" ] || return 1
  "${REPORT_PY}" -c 'import json, sys; sys.exit(0 if (json.load(open(sys.argv[1])).get("components") or {}).get(sys.argv[2]) else 1)' \
    "${RESULTS}/components.json" "$1"
}

# The bare run: one GPU, TP1, the HF rollout (vLLM when installed), and the kernel settings a
# node without Transformer Engine / Apex needs (decided by the `components` check).
bare_grpo_overrides() {
  local optim="$1" otc=actor_rollout_ref.actor.megatron.override_transformer_config
  cat <<EOF
model_preset=tiny
dataset=gsm8k
actor_rollout_ref.model.path=${MODEL}
data.train_files=[${DATA}/train.parquet]
data.val_files=[${DATA}/val.parquet]
data.train_batch_size=4
data.max_prompt_length=1024
data.max_response_length=32
data.filter_overlong_prompts=True
actor_rollout_ref.rollout.n=2
actor_rollout_ref.rollout.tensor_model_parallel_size=1
actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2
actor_rollout_ref.actor.ppo_mini_batch_size=4
actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2
actor_rollout_ref.actor.megatron.tensor_model_parallel_size=1
actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=1
actor_rollout_ref.actor.megatron.vanilla_mbridge=true
actor_rollout_ref.actor.megatron.use_distributed_optimizer=${optim}
actor_rollout_ref.ref.megatron.tensor_model_parallel_size=1
actor_rollout_ref.ref.megatron.pipeline_model_parallel_size=1
actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2
trainer.v1.trainer_mode=grail_megatron
trainer.nnodes=1
trainer.n_gpus_per_node=1
trainer.total_training_steps=2
trainer.save_freq=2
trainer.test_freq=-1
trainer.val_before_train=False
trainer.logger=[console]
trainer.project_name=grail-selftest
trainer.experiment_name=bare-dist-optim-${optim}
trainer.default_local_dir=$(ckpt_of "${optim}")
EOF
  if has_component vllm; then
    printf '%s\n' actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.gpu_memory_utilization=0.3 \
      actor_rollout_ref.rollout.enforce_eager=True
  else
    echo actor_rollout_ref.rollout.name=hf
  fi
  if ! has_component transformer_engine; then  # local layer spec: padded batches, Megatron's attention
    printf '%s\n' actor_rollout_ref.model.use_remove_padding=false "++${otc}.attention_backend=local" \
      "++${otc}.apply_rope_fusion=false"
  fi
  if ! has_component apex; then printf '%s\n' "++${otc}.gradient_accumulation_fusion=false" "++${otc}.persist_layer_norm=false"; fi
  if ! has_component apex_fused_softmax; then echo "++${otc}.masked_softmax_fusion=false"; fi
}

if [ -n "${PRINT}" ]; then
  if [ "${BARE}" = 1 ]; then bare_grpo_overrides "${PRINT}"; else grpo_overrides "${PRINT}"; fi
  exit 0
fi

mkdir -p "${WORK}/logs" "${RESULTS}" "${WORK}/bin"
rm -f "${WORK}/checks.jsonl"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" NVIDIA_TF32_OVERRIDE=0 TOKENIZERS_PARALLELISM=false

wanted() { [ -z "${ONLY}" ] || [[ ",${ONLY}," == *",$1,"* ]]; }

record() {  # NAME STATUS SECONDS REASON [LOG]: one entry of report.json
  [ -n "${REPORT_PY}" ] || return 0
  "${REPORT_PY}" "${HELPERS}/report.py" add "${WORK}" "$@" >/dev/null 2>&1 || true
}

skip_check() {  # NAME REASON
  wanted "$1" || return 0
  echo "SKIP $1: $2"; STATUS[$1]=SKIP; record "$1" SKIP 0 "$2"
}

# run_check NAME NEEDS -- COMMAND...: runs COMMAND with its output in logs/NAME.log, repeats the
# helpers' PASS/FAIL/SKIP lines, then prints the verdict. NEEDS lists checks that must have
# passed (a skipped one skips this one too). Exit status 77 means SKIP (the log says why).
run_check() {
  local name="$1" needs="$2"; shift 3
  wanted "${name}" || return 0
  local dep
  for dep in ${needs}; do
    if [ "${STATUS[${dep}]:-}" = SKIP ]; then skip_check "${name}" "needs ${dep}, which was skipped"; return 0; fi
    if [ "${STATUS[${dep}]:-}" != PASS ] && { [ -z "${ONLY}" ] || wanted "${dep}"; }; then
      echo "FAIL ${name}: skipped, needs ${dep}"; STATUS[${name}]=FAIL; failures=$((failures + 1))
      record "${name}" FAIL 0 "skipped, needs ${dep}"; return 0
    fi
  done
  local log="${WORK}/logs/${name}.log" start=${SECONDS} rc reason
  "$@" >"${log}" 2>&1
  rc=$?
  grep -E '^(PASS|FAIL|SKIP) ' "${log}" | sed 's/^/  /'
  if [ "${rc}" -eq "${SKIPPED_RC}" ] && ! grep -q '^FAIL ' "${log}"; then
    reason="$(grep -E "^SKIP ${name}: " "${log}" | head -n 1 | cut -d' ' -f3-)"
    [ -n "${reason}" ] || reason="$(grep -E '^SKIP ' "${log}" | head -n 1 | cut -d' ' -f2-)"
    echo "SKIP ${name}: ${reason:-not possible here}"; STATUS[${name}]=SKIP
    record "${name}" SKIP $((SECONDS - start)) "${reason:-not possible here}" "${log}"
  elif [ "${rc}" -eq 0 ] && ! grep -q '^FAIL ' "${log}"; then
    echo "PASS ${name} ($((SECONDS - start)) s)"; STATUS[${name}]=PASS
    record "${name}" PASS $((SECONDS - start)) "" "${log}"
  else
    echo "FAIL ${name} (exit ${rc}, $((SECONDS - start)) s; log: ${log})"
    tail -n 5 "${log}" | sed 's/^/    | /'
    STATUS[${name}]=FAIL; failures=$((failures + 1))
    record "${name}" FAIL $((SECONDS - start)) "exit ${rc}; log: ${log}" "${log}"
  fi
}

torchrun_n() { "${PY}" -m torch.distributed.run --standalone --nproc_per_node "${NPROC}" "$@"; }

check_gpus() {
  "${PY}" -c "import sys, torch; n = torch.cuda.device_count(); print(f'{n} CUDA devices'); \
sys.exit(0 if n >= ${NPROC} else 1)"
}

check_grpo() {  # $1: use_distributed_optimizer (true|false)
  local overrides=() ckpt
  ckpt="$(ckpt_of "$1")"
  if [ "${BARE}" = 1 ]; then mapfile -t overrides < <(bare_grpo_overrides "$1"); else mapfile -t overrides < <(grpo_overrides "$1"); fi
  timeout -k 30 "${GRPO_TIMEOUT_S}" grail-megatron train "${overrides[@]}" || return 1
  test -f "${ckpt}/global_step_2/actor/ckpt_contents.json" || { echo "FAIL grpo: no step-2 checkpoint in ${ckpt}"; return 1; }
}

check_grpo_config() {
  local overrides=()
  mapfile -t overrides < <(bare_grpo_overrides true)
  grail-megatron train --dry-run --print-config "${overrides[@]}" >"${WORK}/logs/grpo_config.resolved" || return 1
  echo "PASS grpo_config_dry_run: our composition, planner and verl's validate_config accept the bare run" \
    "($(printf '%s\n' "${overrides[@]}" | grep -c .) overrides, $(printf '%s\n' "${overrides[@]}" | grep -m1 rollout.name=))"
}

check_install() {
  "${PYTHON}" "${HELPERS}/wheelhouse.py" install "${WHEELHOUSE}" --prefix "${PREFIX}" --python "${PYTHON}" \
    --report "${RESULTS}/install.json"
}

check_throughput() {
  if [ "${CPU}" = 1 ]; then
    "${PY}" "${ROOT}/benchmarks/actor_throughput.py" --preset tiny --device cpu --seq 64 --batch 2 \
      --steps 2 --json "${RESULTS}/throughput_harness.json" || return 1
    echo "SKIP throughput: no GPU (--cpu); the same code (verl's engine, bf16) ran on the tiny model on the CPU"
    return "${SKIPPED_RC}"
  fi
  "${PY}" "${ROOT}/benchmarks/actor_throughput.py" --json "${RESULTS}/throughput.json"
}

check_time_budget() {
  local took=$((SECONDS - START))
  if [ "${took}" -le "${BUDGET_S}" ]; then echo "PASS time_budget: ${took} s of ${BUDGET_S} s"; return 0; fi
  echo "FAIL time_budget: the self-test took ${took} s, over its budget of ${BUDGET_S} s"; return 1
}

# In the bare modes `grail-megatron` is this checkout run by the prefix's python.
use_checkout_cli() {
  export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
  printf '#!/bin/sh\nexec "%s" -m grail_megatron.cli "$@"\n' "${PY}" >"${WORK}/bin/grail-megatron"
  chmod +x "${WORK}/bin/grail-megatron"
  export PATH="${WORK}/bin:${PATH}"
}

START=${SECONDS}
echo "grail-megatron self-test (${MODE}); logs in ${WORK}/logs"
if [ "${MODE}" = cpu ]; then
  export CUDA_VISIBLE_DEVICES=""
  run_check tiny_model "" -- "${PY}" "${HELPERS}/make_tiny_model.py" "${MODEL}"
  run_check tp2_local_vs_local "tiny_model" -- torchrun_n "${HELPERS}/tp2_spec_parity.py" --model-dir "${MODEL}" --specs local local
  run_check data "" -- grail-megatron prepare-data --dataset gsm8k --source fixtures --out "${DATA}" --no-progress
  checks=("${CHECKS_CPU[@]}")
elif [ "${MODE}" = gpu ]; then
  run_check gpus "" -- check_gpus
  run_check kernels "gpus" -- "${PY}" "${HELPERS}/check_kernels.py"
  run_check tiny_model "" -- "${PY}" "${HELPERS}/make_tiny_model.py" "${MODEL}"
  run_check tp2_te_vs_local "gpus tiny_model" -- torchrun_n "${HELPERS}/tp2_spec_parity.py" --model-dir "${MODEL}" --specs te local
  run_check data "" -- grail-megatron prepare-data --dataset gsm8k --source fixtures --out "${DATA}" --no-progress
  run_check grpo_2_steps "gpus tiny_model data" -- check_grpo true
  run_check grpo_2_steps_no_dist_optim "gpus tiny_model data" -- check_grpo false
  run_check convert_to_hf "grpo_2_steps" -- grail-megatron convert to-hf --ckpt "${CKPT}/global_step_2/actor" --out "${HF_OUT}" --verify
  run_check hf_export "convert_to_hf" -- "${PY}" "${HELPERS}/check_hf_export.py" --hf-dir "${HF_OUT}" --initial-dir "${MODEL}"
  checks=("${CHECKS_GPU[@]}")
else
  [ "${CPU}" = 1 ] && export CUDA_VISIBLE_DEVICES=""
  inst=""
  if [ -n "${WHEELHOUSE}" ]; then
    run_check install "" -- check_install
    inst=install
    [ "${STATUS[install]:-}" = PASS ] && PY="${PREFIX}/bin/python"
  else
    skip_check install "no --wheelhouse: the checks use ${PYTHON}'s environment as it is"
  fi
  use_checkout_cli
  nogpu="no GPU (--cpu)" gpu_dep="" require_gpu=""
  [ "${CPU}" = 1 ] || { gpu_dep=cuda; require_gpu=--require-gpu; }  # on a GPU node no GPU is a failure
  run_check cuda "${inst}" -- "${PY}" "${HELPERS}/bare_env.py" cuda ${require_gpu} --json "${RESULTS}/cuda.json"
  run_check components "${inst}" -- "${PY}" "${HELPERS}/bare_env.py" components --json "${RESULTS}/components.json"
  run_check tiny_model "${inst}" -- "${PY}" "${HELPERS}/make_tiny_model.py" "${MODEL}"
  run_check megatron_cuda_vs_cpu "tiny_model ${gpu_dep}" -- "${PY}" "${HELPERS}/megatron_device_parity.py" --model-dir "${MODEL}" \
    --json "${RESULTS}/megatron_cuda_vs_cpu.json"
  run_check data "${inst}" -- grail-megatron prepare-data --dataset gsm8k --source fixtures --out "${DATA}" --no-progress
  run_check grpo_config "tiny_model data components" -- check_grpo_config
  if [ "${CPU}" = 1 ]; then
    for name in grpo_2_steps grpo_2_steps_no_dist_optim convert_to_hf hf_export; do skip_check "${name}" "${nogpu}"; done
  else
    run_check grpo_2_steps "cuda grpo_config" -- check_grpo true
    run_check grpo_2_steps_no_dist_optim "cuda grpo_config" -- check_grpo false
    # on the CPU, as users convert: the checkpoint the GPU run wrote
    run_check convert_to_hf "grpo_2_steps" -- env CUDA_VISIBLE_DEVICES= grail-megatron convert to-hf --ckpt "${CKPT}/global_step_2/actor" --out "${HF_OUT}" --verify
    novllm=$(has_component vllm || echo --no-vllm)
    run_check hf_export "convert_to_hf" -- "${PY}" "${HELPERS}/check_hf_export.py" --hf-dir "${HF_OUT}" --initial-dir "${MODEL}" ${novllm}
  fi
  run_check throughput "${inst} ${gpu_dep}" -- check_throughput
  run_check time_budget "" -- check_time_budget
  checks=("${CHECKS_BARE[@]}")
fi

passed=0 skipped=0
for name in "${checks[@]}"; do
  case "${STATUS[${name}]:-}" in PASS) passed=$((passed + 1)) ;; SKIP) skipped=$((skipped + 1)) ;; esac
done
[ -n "${REPORT_PY}" ] && "${REPORT_PY}" "${HELPERS}/report.py" finish "${WORK}" "${MODE}" 2>/dev/null
echo "${passed} passed, ${failures} failed$([ "${skipped}" -gt 0 ] && echo ", ${skipped} skipped")"
exit "${failures}"
