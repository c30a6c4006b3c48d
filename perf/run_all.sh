#!/usr/bin/env bash
# Ours against vLLM's OpenAI server on the bench checkpoint: every workload in one run, table and plots in
# build/perf/. Arguments go to `python -m perf.run_all` (see its --help), e.g. --glue 32,64 --seed 1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -c "import matplotlib" 2>/dev/null || .venv/bin/python -m pip install --quiet -e '.[bench]'
exec .venv/bin/python -m perf.run_all "$@"
