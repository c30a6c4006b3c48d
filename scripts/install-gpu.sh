#!/usr/bin/env bash
# Inside the NGC containers of docker-compose.yml: the project with the extras named (default: the models and
# vLLM's CUDA wheel), at the pins of pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -o "\"$1==[^\"]*\"" pyproject.toml | head -n 1 | tr -d '"'; }
python -m pip install --quiet -e ".[${1:-models,vllm-gpu}]"
# Triton's 2.51 Python-backend stub needs numpy 1.x (see the embedded-server extra in pyproject.toml).
python -m pip install --quiet --no-deps "$(pin numpy)"
