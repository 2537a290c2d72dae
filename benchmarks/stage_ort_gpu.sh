#!/usr/bin/env bash
# Stages what the GPU check carries to a lent GPU machine (which reaches no registry, and takes 64 MiB a call):
#   .gpuwheel0/ .gpuwheel1/ ...  onnxruntime-gpu (cp312, CUDA 13) repacked as one .tar.xz, split in parts of
#                                PART_MiB, one folder per part so that each call carries one folder
#   .whl/                        diffusers, importlib-metadata and DeepCache (the baseline's DeepCache helper),
#                                the pure-Python wheels the image lacks
# The repack drops the TensorRT execution provider's library (that machine has no TensorRT to load it) and
# recompresses with xz: 203 MB in 4 parts instead of the wheel's 256 MB in 5, one call fewer.
# Usage, from the project root: benchmarks/stage_ort_gpu.sh [PART_MiB]
set -euo pipefail
mib=${1:-50}
version=1.31.1
grep -qx '/.gpuwheel\*/' .git/info/exclude || echo '/.gpuwheel*/' >>.git/info/exclude
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >>.git/info/exclude
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip_download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 "$@"
}
pip_download -d "$work" "onnxruntime-gpu==$version"
mkdir "$work/x"
python3 -m zipfile -e "$work"/onnxruntime_gpu-*.whl "$work/x"
rm -f "$work"/x/onnxruntime/capi/libonnxruntime_providers_tensorrt.so
name=onnxruntime_gpu-$version-cp312.tar.xz
tar -cf - -C "$work/x" . | xz -T0 -7 >"$work/$name"
rm -rf .gpuwheel*/
split -b "${mib}M" -d -a 1 "$work/$name" "$work/part-"
for part in "$work"/part-*; do
  k=${part##*-}
  mkdir -p ".gpuwheel$k"
  mv "$part" ".gpuwheel$k/part-$k"
  echo "$name" >".gpuwheel$k/NAME"
done
rm -rf .whl && pip_download -d .whl diffusers==0.42.1 importlib-metadata DeepCache==0.1.1
echo "$name: $(du -m "$work/$name" | cut -f1) MiB in $(ls -d .gpuwheel*/ | wc -l) parts (.gpuwheel0/ ...); .whl/: $(ls .whl | tr '\n' ' ')"
