#!/usr/bin/env bash
# Build the offline wheelhouse of the bare GPU self-test (scripts/gpu_selftest.sh --bare) on a
# machine with internet access:
#
#   scripts/make_wheelhouse.sh OUT [--part-mb N] [--requirements FILE] [--no-build-isolation] [--dry-run]
#
# Everything grail-megatron needs on top of a GPU node's own torch, for CPython 3.12 on Linux
# x86_64, pinned by grail_megatron/versions.toml: pip resolves grail-megatron's dependencies
# (pyproject.toml) with the matrix as constraints, drops torch and its CUDA runtime (torch,
# triton, nvidia-*, cuda-*), downloads every wheel (hashes checked against the index) and
# builds a wheel from every sdist. Output:
#   OUT/wheels/*.whl        the wheels
#   OUT/requirements.txt    name==version --hash=sha256:... for each (what the install uses)
#   OUT/manifest.json       size, sha256 and origin of every file, the matrix, what was excluded
#   OUT/parts/              with --part-mb N: tar files of at most N MB (10^6 bytes) each and a
#                           copy of manifest.json; copy this folder when transfers are limited
#
# --requirements FILE replaces grail-megatron's dependency list (one requirement per line);
# --no-build-isolation builds sdists with this Python's setuptools (faster, offline builds);
# --dry-run only resolves and prints the set. Needs Python 3.12 on Linux x86_64 (sdists are
# compiled here): PYTHON312=/path/to/python3.12, else the one tools/find_python312.sh finds.
# On the node: scripts/gpu_selftest.sh --bare --wheelhouse OUT (or OUT/parts).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${1:-}" in
  ""|-h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; [ -n "${1:-}" ]; exit $? ;;
esac
PY="${PYTHON312:-$(bash "${ROOT}/tools/find_python312.sh")}"
exec "${PY}" "${ROOT}/docker/selftest/wheelhouse.py" build "$@"
