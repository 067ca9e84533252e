#!/usr/bin/env bash
# Self-test of the grail-megatron CUDA image. Run it inside the image on a node with >= 2 GPUs:
#
#   docker run --rm --gpus all --ipc=host grail-megatron:cu13 bash scripts/gpu_selftest.sh
#
# It prints one `PASS <check>` or `FAIL <check>` line per check (with sub-results of the
# helpers in docker/selftest/), keeps every log under $GRAIL_SELFTEST_DIR/logs, and exits with
# the number of failed checks (0 = everything passed). The checks, in order:
#   gpus            torch sees >= GRAIL_SELFTEST_GPUS CUDA devices
#   kernels         TE, Apex (C++/CUDA extensions), flash-attn, Megatron's fused kernels, patches/
#   tiny_model      a tiny random-init Qwen2 + tokenizer (configs/model_preset/tiny.yaml sizes)
#   tp2_te_vs_local TP2 forward: Transformer Engine layer spec vs local spec vs Hugging Face
#   data            GSM8K fixture parquet files (grail-megatron prepare-data --source fixtures)
#   grpo_2_steps    two GRPO steps through verl 0.9.1 with the vLLM rollout (grail-megatron train)
#   convert_to_hf   the step-2 checkpoint to a Hugging Face folder, logits verified (convert to-hf)
#   hf_export       the converted folder loads in transformers and generates with vLLM
#
# This part is verified by users on GPU nodes, not in CI (CI has no GPU). `--cpu` runs the checks
# that need no GPU (tiny_model, tp2 with the local spec on both sides, data) on gloo, which is
# what tests/container runs; `--print-grpo-overrides` prints the Hydra overrides of grpo_2_steps.
#
# Environment: GRAIL_SELFTEST_DIR (work dir, default: a new temp dir), GRAIL_SELFTEST_GPUS (2),
# GRAIL_SELFTEST_ONLY (comma-separated subset of checks), PYTHON (python of the image's venv).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HELPERS="${ROOT}/docker/selftest"
PYTHON="${PYTHON:-python}"
NPROC="${GRAIL_SELFTEST_GPUS:-2}"
ONLY="${GRAIL_SELFTEST_ONLY:-}"
MODE=gpu
CHECKS_GPU=(gpus kernels tiny_model tp2_te_vs_local data grpo_2_steps convert_to_hf hf_export)
CHECKS_CPU=(tiny_model tp2_local_vs_local data)

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --cpu) MODE=cpu ;;
  --print-grpo-overrides) MODE=print ;;
  "") ;;
  *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
esac

if [ "${MODE}" = print ]; then
  WORK="${GRAIL_SELFTEST_DIR:-/tmp/grail-selftest}"  # only printed, nothing is created
else
  WORK="${GRAIL_SELFTEST_DIR:-$(mktemp -d -t grail-selftest.XXXXXX)}"
fi
MODEL="${WORK}/tiny_model"
DATA="${WORK}/data/gsm8k"
CKPT="${WORK}/checkpoints"
HF_OUT="${WORK}/hf_step2"
failures=0
declare -A STATUS=()

# The two-step GRPO run: the tiny model on the GSM8K fixtures, actor/ref at TP=NPROC, a vLLM
# rollout on each GPU, a checkpoint after step 2. Everything else is GRAIL's recipe.
grpo_overrides() {
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
actor_rollout_ref.ref.megatron.tensor_model_parallel_size=${NPROC}
actor_rollout_ref.ref.megatron.pipeline_model_parallel_size=1
actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2
trainer.nnodes=1
trainer.n_gpus_per_node=${NPROC}
trainer.total_training_steps=2
trainer.save_freq=2
trainer.test_freq=-1
trainer.val_before_train=False
trainer.logger=[console]
trainer.project_name=grail-selftest
trainer.experiment_name=selftest
trainer.default_local_dir=${CKPT}
EOF
}

if [ "${MODE}" = print ]; then grpo_overrides; exit 0; fi

mkdir -p "${WORK}/logs"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" NVIDIA_TF32_OVERRIDE=0 TOKENIZERS_PARALLELISM=false

wanted() { [ -z "${ONLY}" ] || [[ ",${ONLY}," == *",$1,"* ]]; }

# run_check NAME NEEDS -- COMMAND...: runs COMMAND with its output in logs/NAME.log, repeats the
# helpers' PASS/FAIL lines, then prints the verdict. NEEDS lists checks that must have passed.
run_check() {
  local name="$1" needs="$2"; shift 3
  wanted "${name}" || return 0
  local dep
  for dep in ${needs}; do
    if [ "${STATUS[${dep}]:-}" != PASS ] && { [ -z "${ONLY}" ] || wanted "${dep}"; }; then
      echo "FAIL ${name}: skipped, needs ${dep}"; STATUS[${name}]=FAIL; failures=$((failures + 1)); return 0
    fi
  done
  local log="${WORK}/logs/${name}.log" start=${SECONDS} rc
  "$@" >"${log}" 2>&1
  rc=$?
  grep -E '^(PASS|FAIL) ' "${log}" | sed 's/^/  /'
  if [ "${rc}" -eq 0 ] && ! grep -q '^FAIL ' "${log}"; then
    echo "PASS ${name} ($((SECONDS - start)) s)"; STATUS[${name}]=PASS
  else
    echo "FAIL ${name} (exit ${rc}, $((SECONDS - start)) s; log: ${log})"
    tail -n 5 "${log}" | sed 's/^/    | /'
    STATUS[${name}]=FAIL; failures=$((failures + 1))
  fi
}

torchrun_n() { "${PYTHON}" -m torch.distributed.run --standalone --nproc_per_node "${NPROC}" "$@"; }

check_gpus() {
  "${PYTHON}" -c "import sys, torch; n = torch.cuda.device_count(); print(f'{n} CUDA devices'); \
sys.exit(0 if n >= ${NPROC} else 1)"
}

check_grpo() {
  local overrides=()
  mapfile -t overrides < <(grpo_overrides)
  grail-megatron train "${overrides[@]}" || return 1
  test -f "${CKPT}/global_step_2/actor/ckpt_contents.json" || { echo "FAIL grpo_2_steps: no step-2 checkpoint in ${CKPT}"; return 1; }
}

echo "grail-megatron self-test (${MODE}); logs in ${WORK}/logs"
if [ "${MODE}" = cpu ]; then
  export CUDA_VISIBLE_DEVICES=""
  run_check tiny_model "" -- "${PYTHON}" "${HELPERS}/make_tiny_model.py" "${MODEL}"
  run_check tp2_local_vs_local "tiny_model" -- torchrun_n "${HELPERS}/tp2_spec_parity.py" --model-dir "${MODEL}" --specs local local
  run_check data "" -- grail-megatron prepare-data --dataset gsm8k --source fixtures --out "${DATA}" --no-progress
  checks=("${CHECKS_CPU[@]}")
else
  run_check gpus "" -- check_gpus
  run_check kernels "gpus" -- "${PYTHON}" "${HELPERS}/check_kernels.py"
  run_check tiny_model "" -- "${PYTHON}" "${HELPERS}/make_tiny_model.py" "${MODEL}"
  run_check tp2_te_vs_local "gpus tiny_model" -- torchrun_n "${HELPERS}/tp2_spec_parity.py" --model-dir "${MODEL}" --specs te local
  run_check data "" -- grail-megatron prepare-data --dataset gsm8k --source fixtures --out "${DATA}" --no-progress
  run_check grpo_2_steps "gpus tiny_model data" -- check_grpo
  run_check convert_to_hf "grpo_2_steps" -- grail-megatron convert to-hf --ckpt "${CKPT}/global_step_2/actor" --out "${HF_OUT}" --verify
  run_check hf_export "convert_to_hf" -- "${PYTHON}" "${HELPERS}/check_hf_export.py" --hf-dir "${HF_OUT}" --initial-dir "${MODEL}"
  checks=("${CHECKS_GPU[@]}")
fi

ran=0
for name in "${checks[@]}"; do [ -n "${STATUS[${name}]:-}" ] && ran=$((ran + 1)); done
echo "$((ran - failures)) passed, ${failures} failed"
exit "${failures}"
