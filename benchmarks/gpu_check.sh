#!/usr/bin/env bash
# The GPU check, for a lent GPU machine whose image has torch, onnx and cuda-python but CPU-only onnxruntime.
#   bash benchmarks/gpu_check.sh prepare   installs the carried small wheels (.whl/: diffusers and what it
#                                          needs) and starts, in the background, the large random checkpoint
#                                          and its fp16 exports, portable, CUDA-fused and cut for
#                                          DeepCache (gpu_check.py --prepare), so that work overlaps the
#                                          calls that carry ONNX Runtime's parts
#   bash benchmarks/gpu_check.sh [ARGS]    joins the parts in /tmp/gpuwheel (benchmarks/stage_ort_gpu.sh makes
#                                          them), installs onnxruntime-gpu, and runs benchmarks/gpu_check.py
#                                          ARGS, which writes its tables and JSON to $OUT (or gpu-check-out/)
# Staging, from this machine: benchmarks/README.md ("Running the GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
site=/tmp/site
mkdir -p "$site"
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ ! -f "$site/.small-wheels" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
  touch "$site/.small-wheels"
fi
if [ "${1:-}" = prepare ]; then
  python3 -c "import diffusers, torch, onnx; print('diffusers', diffusers.__version__, 'torch', torch.__version__, 'onnx', onnx.__version__)"
  # the portable export writes the checkpoint first; the fused one, started a little later, waits for it
  setsid nohup python3 -m benchmarks.gpu_check --prepare portable >/tmp/gpu-check-prepare.log 2>&1 </dev/null &
  echo "preparing the portable export in the background (pid $!): /tmp/gpu-check-prepare.log"
  sleep 10
  setsid nohup python3 -m benchmarks.gpu_check --prepare cuda >/tmp/gpu-check-prepare-cuda.log 2>&1 </dev/null &
  echo "preparing the CUDA-fused export in the background (pid $!): /tmp/gpu-check-prepare-cuda.log"
  setsid nohup python3 -m benchmarks.gpu_check --prepare deepcache >/tmp/gpu-check-prepare-deepcache.log 2>&1 </dev/null &
  echo "preparing the export cut for DeepCache in the background (pid $!): /tmp/gpu-check-prepare-deepcache.log"
  exit 0
fi
if [ ! -d "$site/onnxruntime" ]; then
  name=$(cat /tmp/gpuwheel/NAME)
  cat /tmp/gpuwheel/part-* >"/tmp/gpuwheel/$name"
  case "$name" in
    *.whl) python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "/tmp/gpuwheel/$name" ;;
    *.tar.xz) tar -xJf "/tmp/gpuwheel/$name" -C "$site" ;;
    *) echo "gpu_check.sh: unknown package $name" >&2; exit 2 ;;
  esac
fi
python3 -c "import onnxruntime as o; o.preload_dlls(); print('onnxruntime', o.__version__, o.get_available_providers())"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "background preparation, so far:"; tail -n 2 /tmp/gpu-check-prepare*.log 2>/dev/null || echo "(none ran)"
timeout 540 python3 -m benchmarks.gpu_check --out "${OUT:-gpu-check-out}" "$@"
