#!/usr/bin/env bash
# perf_analyzer / genai-perf recipes against a running stack (scripts/serve.sh or any tritonserver with our repository).
#
#   bash perf/perf_analyzer.sh vit      # the vision tower alone: real preprocessed images, gRPC, concurrency sweep
#   bash perf/perf_analyzer.sh vlm      # the whole BLS model, decoupled streaming: chat requests with one image each
#   bash perf/perf_analyzer.sh openai   # genai-perf through the OpenAI proxy: TTFT, inter-token latency, tokens/s
#
# Environment: TRITON_GRPC (127.0.0.1:8001), OPENAI_URL (127.0.0.1:8000), MODEL (tiny-qwen2-vl, for
# genai-perf), CHECKPOINT (build/tiny-qwen2-vl: what the input data and genai-perf's tokenizer come
# from), CONCURRENCY (1:4 for perf_analyzer, one number for genai-perf: 4), OUT (build/perf_analyzer/runs).
# Anything after the recipe name goes to perf_analyzer / genai-perf as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=${1:?usage: perf/perf_analyzer.sh vit|vlm|openai [extra perf_analyzer/genai-perf arguments]}
shift
python=${PYTHON:-.venv/bin/python}
grpc=${TRITON_GRPC:-127.0.0.1:8001}
checkpoint=${CHECKPOINT:-build/tiny-qwen2-vl}
out=${OUT:-build/perf_analyzer/runs}
mkdir -p "$out"

binary=${PERF_ANALYZER:-}
if [ -z "$binary" ]; then
  if [ -x build/perf_analyzer/perf_analyzer ]; then
    binary=build/perf_analyzer/perf_analyzer
  else
    binary=$(command -v perf_analyzer || true)
  fi
fi
if [ -z "$binary" ]; then
  cat >&2 <<EOF
perf_analyzer is not installed on this machine.
  bash perf/get_perf_analyzer.sh     # unpacks it from the tritonclient 2.51 wheel (needs PyPI and Debian's archive)
or run this script inside NVIDIA's SDK container (nvcr.io/nvidia/tritonserver:<yy.mm>-py3-sdk), which has it.
EOF
  exit 3
fi
export LD_LIBRARY_PATH="$(dirname "$binary")/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$(dirname "$binary"):$PATH"  # genai-perf runs perf_analyzer from PATH

inputs=build/perf_analyzer/inputs/$(basename "$checkpoint")
if [ "$recipe" != openai ] && [ ! -e "$inputs/$recipe.json" ]; then
  "$python" -m perf.perf_analyzer_inputs "$checkpoint" "$inputs"
fi
# A shared 2-core machine never holds 10% stability over time windows: count windows, 50%.
stable=(--measurement-mode count_windows --measurement-request-count 50 --stability-percentage 50 --max-trials 6)

case "$recipe" in
  vit)
    exec "$binary" -m vit -i grpc -u "$grpc" --input-data "$inputs/vit.json" \
      --concurrency-range "${CONCURRENCY:-1:4}" "${stable[@]}" -f "$out/vit.csv" "$@"
    ;;
  vlm)
    # Decoupled: latency is to the first response (time to first token). After one pass over the
    # file's distinct images the ViT cache knows them all (see perf/perf_analyzer_inputs.py).
    exec "$binary" -m vlm -i grpc -u "$grpc" --streaming --input-data "$inputs/vlm.json" \
      --concurrency-range "${CONCURRENCY:-1:4}" "${stable[@]}" -f "$out/vlm.csv" "$@"
    ;;
  openai)
    genai=${GENAI_PERF:-}
    if [ -z "$genai" ]; then
      if [ -x build/genai-perf/bin/genai-perf ]; then genai=build/genai-perf/bin/genai-perf; else genai=$(command -v genai-perf || true); fi
    fi
    if [ -z "$genai" ]; then
      cat >&2 <<EOF
genai-perf is not installed on this machine. It pulls about 1 GB of its own dependencies, so give it its own venv:
  python3 -m venv build/genai-perf && build/genai-perf/bin/pip install genai-perf==0.0.16
EOF
      exit 3
    fi
    # Synthetic requests: one JPEG of about 320x240 (sent as a data: URL) and ~64 prompt tokens each.
    exec "$genai" profile -m "${MODEL:-tiny-qwen2-vl}" --endpoint-type multimodal --streaming \
      -u "${OPENAI_URL:-127.0.0.1:8000}" --tokenizer "$checkpoint" \
      --image-width-mean 320 --image-height-mean 240 --image-format jpeg \
      --synthetic-input-tokens-mean 64 --output-tokens-mean 32 \
      --concurrency "${CONCURRENCY:-4}" --request-count 40 --warmup-request-count 4 \
      --artifact-dir "$out/genai-perf" "$@"
    ;;
  *)
    echo "unknown recipe '$recipe': vit, vlm or openai" >&2
    exit 2
    ;;
esac
