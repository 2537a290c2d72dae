#!/usr/bin/env bash
# Sets up .venv, then runs the offline demo: tiny random checkpoint -> ONNX -> image, PyTorch beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/sdengine demo "$@"
