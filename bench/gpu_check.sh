#!/usr/bin/env bash
# Check dvp_fast on a fresh GPU machine in under 8 minutes (see bench/gpu_check.py for the stages):
#   DVP_GPU_CHECK_OUT=$OUT [DVP_GPU_CHECK_WHEELS=carry/wheels] bash bench/gpu_check.sh [--dry-run]
set -u
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
