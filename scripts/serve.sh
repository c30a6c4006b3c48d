#!/usr/bin/env bash
# Set up (first run) and serve: tritonserver with our model repository + the OpenAI proxy on 127.0.0.1.
# Arguments go to `python -m launcher.serve` (e.g. --checkpoint /models/Qwen2-VL-2B-Instruct --port 8000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m launcher.serve "$@"
