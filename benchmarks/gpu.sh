#!/usr/bin/env bash
# The GPU benchmark (benchmarks/gpu.py) with this checkout's venv and the offline data mirror.
#   bash benchmarks/gpu.sh             # on a CUDA machine: one Markdown table, < 8 minutes
#   bash benchmarks/gpu.sh --dry-run   # anywhere: tiny shapes on the CPU, checks that it runs
set -euo pipefail
cd "$(dirname "$0")/.."
export LLMPIPE_MIRROR="${LLMPIPE_MIRROR:-$(cd .. && pwd)/shared/data}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-.venv/bin/python}"
case " $* " in
  *" --dry-run "*) exec "$PYTHON" -m benchmarks.gpu "$@" ;;  # a slow CPU box: no limit
  *) exec timeout 540 "$PYTHON" -m benchmarks.gpu "$@" ;;     # a lent GPU's minutes are counted
esac
