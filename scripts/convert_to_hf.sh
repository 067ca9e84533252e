#!/usr/bin/env bash
# Convert a checkpoint written by the training scripts (verl's layout) to a Hugging Face folder.
#
#   scripts/convert_to_hf.sh CKPT [OUT] [extra `grail-megatron convert to-hf` options]
#
# CKPT is a run's checkpoint root (trainer.default_local_dir: the newest *complete* step is
# used), a .../global_step_N directory or a .../global_step_N/actor directory. OUT defaults to
# <step dir>/hf. Runs on CPU (no GPU, no NCCL), streams tensor by tensor, verifies the logits of
# both sides (--verify) before publishing OUT. Exit status as grail-megatron's: 0 ok, 1 a check
# (--verify) failed, 2 bad input, 3 broken environment.
# Environment: PYTHON (default: the repo's .venv/bin/python, else python3), VERIFY=0 to skip --verify.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then usage; exit $(( $# < 1 ? 2 : 0 )); fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "${ROOT}/.venv/bin/python" ]]; then PYTHON="${ROOT}/.venv/bin/python"; else PYTHON=python3; fi
fi
CKPT="$1"; shift
if [[ ! -e "${CKPT}" ]]; then echo "convert_to_hf.sh: ${CKPT}: no such checkpoint" >&2; exit 2; fi

OUT=""
if [[ $# -gt 0 && "$1" != --* ]]; then OUT="$1"; shift; fi
if [[ -z "${OUT}" ]]; then
  # resolve the step directory the converter will use, to put the HF folder next to it
  # (one line on failure, exit 2: the project's "bad input")
  STEP_DIR="$("${PYTHON}" -c '
import sys
from grail_megatron.checkpoint import CheckpointError
from grail_megatron.checkpoint.manifest import resolve_checkpoint
try:
    p = resolve_checkpoint(sys.argv[1])
except CheckpointError as exc:
    sys.exit(f"convert_to_hf.sh: {exc}")
print(p.parent if p.name == "actor" else p)' "${CKPT}")" || exit 2
  OUT="${STEP_DIR}/hf"
fi

VERIFY_FLAG=(--verify)
[[ "${VERIFY:-1}" == "0" ]] && VERIFY_FLAG=()
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${PYTHON}" -m grail_megatron.cli convert to-hf --ckpt "${CKPT}" --out "${OUT}" "${VERIFY_FLAG[@]}" "$@"
