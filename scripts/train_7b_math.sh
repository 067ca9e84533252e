#!/usr/bin/env bash
# GRAIL GRPO on verl 0.9.1's Megatron backend: qwen2.5-7b-instruct on Hendrycks MATH, one node of 8 GPUs.
#
#   DATASET=math MODEL=Qwen/... BATCH_SIZE=2 GRAD_ACCUM=256 LR=3e-6 WARMUP_STEPS=20 TOTAL_STEPS=400 \
#   ROLLOUTS=16 CLIP_LOW=0.2 CLIP_HIGH=0.28 TEMPERATURE=0.7 TOP_P=0.95 TOP_K=50 \
#   scripts/train_7b_math.sh [hydra overrides...]
#
# DRY_RUN=1 prints the resolved config and the memory/layout plan and launches nothing (no GPU
# needed). KL=1 adds the low_var_kl loss and the reference worker. NNODES=N uses N x 8 GPUs.
# LOGGER=console,tensorboard,wandb adds wandb (WANDB_MODE=offline works). Data comes from
# `grail-megatron prepare-data` under GRAIL_DATA_ROOT (default ./data). The mapping of every
# variable onto verl's keys: docs/config.md and grail_megatron/cli/env_launch.py.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$HERE/../.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3
export DATASET="${DATASET:-math}"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # Megatron comm/compute overlap

exec "$PYTHON" -m grail_megatron.cli.env_launch --model-preset qwen2.5-7b-instruct "$@"
