#!/usr/bin/env bash
# Sets up ./.venv with ppl and its dependencies (idempotent; safe to re-run).
#
# torch is installed first and pinned, so that the wide `torch>=2.1` in pyproject.toml
# never makes pip pull a multi-GB CUDA build on a machine without a GPU:
#   - a GPU (nvidia-smi works): the default torch wheel (CUDA);
#   - no GPU: the CPU build (from a local wheel cache if pip has one, else the CPU
#     wheel index named by PPL_TORCH_CPU_INDEX).
# Override the version with PPL_TORCH_VERSION.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${PPL_TORCH_VERSION:-2.13.0}
CPU_INDEX=${PPL_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] GPU found: installing torch==$TORCH_VERSION"
    "$PY" -m pip install -q "torch==$TORCH_VERSION"
  else
    echo "[setup] no GPU: installing the CPU build of torch==$TORCH_VERSION"
    "$PY" -m pip install -q "torch==$TORCH_VERSION" --extra-index-url "$CPU_INDEX" --timeout 20 --retries 1
  fi
fi

if ! "$PY" -c "import ppl, lark, pyro, hypothesis, pytest" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.ppl-installed ]; then
  echo "[setup] installing ppl (editable) and its dependencies"
  "$PY" -m pip install -q -e ".[test,lm,notebook]"
  touch .venv/.ppl-installed
fi
# NUTS's per-machine parts (its C++ loops, AOTInductor's precompiled headers and wrapper runtime:
# ~30 s once), built here rather than in a machine's first NUTS run; a second run returns at once
"$PY" -c "import torch, ppl; from ppl.inference.prepare import main; main()
print('[setup] ok: torch', torch.__version__, '| cuda:', torch.cuda.is_available())"
