#!/usr/bin/env bash
# Create .venv with the pinned dependencies from pyproject.toml (reinstalls only when it changes).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.pyproject.sha256
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch first and alone, so the CPU build on this disk is chosen before anything else asks for torch.
  .venv/bin/python -m pip install --quiet "$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')"
  .venv/bin/python -m pip install --quiet -e '.[models,proxy,embedded-server,test]'
  echo "$want" > "$stamp"
fi
