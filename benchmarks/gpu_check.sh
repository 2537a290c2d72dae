#!/usr/bin/env bash
# The GPU check, for a lent GPU machine whose image has torch, onnx and cuda-python but CPU-only onnxruntime.
# Installs the carried wheels (onnxruntime-gpu from /tmp/gpuwheel, reassembled from the parts that
# ../shared/gpu/stage-wheel makes; diffusers and any other small pure-Python wheels from .whl/), then runs
# benchmarks/gpu_check.py, which writes its tables and JSON to $OUT (or gpu-check-out/).
#   Staging, from this machine: see benchmarks/README.md ("Running the GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
site=/tmp/site
mkdir -p "$site"
if [ -d /tmp/gpuwheel ] && ls /tmp/gpuwheel/part-* >/dev/null 2>&1; then
  name=$(cat /tmp/gpuwheel/NAME)
  [ -f "/tmp/gpuwheel/$name" ] || cat /tmp/gpuwheel/part-* >"/tmp/gpuwheel/$name"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "/tmp/gpuwheel/$name"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import onnxruntime as o; o.preload_dlls(); print('onnxruntime', o.__version__, o.get_available_providers())"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
timeout 470 python3 -m benchmarks.gpu_check --out "${OUT:-gpu-check-out}" "$@"
