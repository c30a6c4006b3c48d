#!/usr/bin/env bash
# Put perf_analyzer in build/perf_analyzer/ (once), without touching the virtualenv.
# The PyPI `perf-analyzer` name is a placeholder and recent tritonclient wheels lack the binary; the
# manylinux1 wheel of tritonclient 2.51 (the release of the tritonserver we run) has it. It loads
# libcudart.so.12 even on a CPU-only host (from NVIDIA's wheel) and Debian's libb64.so.0d.
# All three are unpacked into build/perf_analyzer/, not installed: tritonclient 2.51 would replace
# the venv's client, and the .deb needs no root this way.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=build/perf_analyzer
if [ -x "$dest/perf_analyzer" ] && [ -e "$dest/lib/libcudart.so.12" ] && [ -e "$dest/lib/libb64.so.0d" ]; then
  echo "$dest/perf_analyzer"
  exit 0
fi
python=${PYTHON:-.venv/bin/python}
downloads=$(mktemp -d)
trap 'rm -rf "$downloads"' EXIT
mkdir -p "$dest/lib"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux1_x86_64 \
  tritonclient==2.51.0 -d "$downloads"
"$python" -m pip download --quiet --no-deps --only-binary=:all: nvidia-cuda-runtime-cu12==12.9.79 -d "$downloads"
unzip -q -o -j "$downloads"/tritonclient-2.51.0-*.whl 'tritonclient-2.51.0.data/data/bin/perf_analyzer' -d "$dest"
unzip -q -o -j "$downloads"/nvidia_cuda_runtime_cu12-*.whl 'nvidia/cuda_runtime/lib/libcudart.so.12' -d "$dest/lib"
(cd "$downloads" && apt-get download libb64-0d >/dev/null 2>&1) || {
  echo "apt-get download libb64-0d failed (run 'apt-get update' first, or install libb64-0d)" >&2
  exit 1
}
dpkg-deb -x "$downloads"/libb64-0d_*.deb "$downloads/deb"
cp "$downloads"/deb/usr/lib/x86_64-linux-gnu/libb64.so.0d "$dest/lib/"
chmod +x "$dest/perf_analyzer"
echo "$dest/perf_analyzer"
