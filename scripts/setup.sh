#!/usr/bin/env bash
# Create .venv and install the project. Usage: scripts/setup.sh [dev]
#
# PyPI's default torch wheel for Linux is a multi-GB CUDA build. On a machine without an NVIDIA
# GPU we install the CPU build first (PyTorch's CPU index; its "+cpu" wheel sorts above the plain
# version), so the project's own "torch" requirement is already satisfied. With a GPU, torch
# comes from PyPI as usual. Override with TORCH_SPEC / TORCH_INDEX_URL.
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "setup: NVIDIA GPU found: installing torch from PyPI (CUDA build)"
        "${pip[@]}" install "${TORCH_SPEC:-torch>=2.4,<2.15}"
    else
        echo "setup: no NVIDIA GPU: installing the CPU build of torch"
        "${pip[@]}" install --retries 1 "${TORCH_SPEC:-torch==2.13.0}" \
            --extra-index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
    fi
fi
"${pip[@]}" install -e ".${extra}"
# `dvc plots show` offline: vega inlined into this clone's DVC page template (from the npm registry).
.venv/bin/python -m scripts.offline_plots || true
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
