#!/usr/bin/env bash
# CPU smoke run of the whole pipeline (`make smoke`, after `make setup`): sums data -> tiny
# Qwen2 with a locally trained tokenizer -> warm start -> GRPO at TP=2 under torchrun (gloo)
# -> checkpoints -> HF export + reload, with the learning-signal check. See docs/local.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=offline
exec .venv/bin/python -m grail_megatron.local.smoke --work "${SMOKE_DIR:-outputs/smoke}" "$@"
