#!/usr/bin/env bash
# Install cryoace (editable) with its test tools into the current Python environment.
# On machines without an NVIDIA GPU, install the CPU build of PyTorch first so that pip does not pull
# gigabytes of CUDA packages for the "torch>=2.1" requirement; GPU machines keep/get a CUDA build.
set -euo pipefail
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install: NVIDIA GPU found, installing a CUDA build of PyTorch" >&2
    "$PYTHON" -m pip install "torch>=2.1"
  else
    echo "install: no GPU, installing the CPU build of PyTorch (torch==${CRYOACE_CPU_TORCH:-2.13.0})" >&2
    "$PYTHON" -m pip install "torch==${CRYOACE_CPU_TORCH:-2.13.0}"
  fi
fi
"$PYTHON" -m pip install -e ".[test]"
