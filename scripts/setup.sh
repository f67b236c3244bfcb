#!/usr/bin/env bash
# Create .venv and install the project from its lock file. Usage: scripts/setup.sh [dev]
#
# Every package comes from requirements/<variant>.lock with its hash (pip --require-hashes), so a
# fresh machine gets exactly the versions CI tested; scripts/lock.sh refreshes the locks. The
# variant: on a machine without an NVIDIA GPU torch's CPU build (PyTorch's CPU index; PyPI's
# default Linux wheel is a multi-GB CUDA build), with one (`nvidia-smi` works) PyPI's CUDA build.
# TORCH_INDEX_URL overrides the CPU index; LLMPIPE_UNLOCKED=1 installs the newest allowed versions.
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
[ "${1:-}" = "dev" ] && extra="dev"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    variant=cuda index=()
    echo "setup: NVIDIA GPU found: torch from PyPI (CUDA build)"
else
    variant=cpu index=(--extra-index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}")
    echo "setup: no NVIDIA GPU: torch's CPU build"
fi
if [ -n "${LLMPIPE_UNLOCKED:-}" ]; then
    "${pip[@]}" install "${index[@]}" -e ".${extra:+[$extra]}"
else
    lock="requirements/${variant}${extra:+-$extra}.lock"
    echo "setup: installing $lock (hash-checked)"
    # The lock is the whole dependency closure: nothing to resolve, every file checked.
    "${pip[@]}" install --retries 1 --require-hashes --no-deps "${index[@]}" -r "$lock"
    "${pip[@]}" install --no-deps -e .
    "${pip[@]}" check
fi
# `dvc plots show` offline: vega inlined into this clone's DVC page template (from the npm registry).
.venv/bin/python -m scripts.offline_plots || true
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
