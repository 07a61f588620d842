#!/bin/bash
# Builds .devcarry/fa4a and .devcarry/fa4b (gitignored): flash-attn-4 (CuTe DSL, Hopper and Blackwell kernels with
# local windows and a differentiable log-sum-exp) and the wheels it needs that the GPU machine's image lacks, for
# Python 3.12. About 102 MB, so the 92 MB CUDA 13 library wheel of the CuTe DSL travels in two parts:
#   bash bench/device/prepare_fa4_carry.sh
# then on the device tool: a call carrying .devcarry/fa4a that runs `mkdir -p /root/keep && cp .devcarry/fa4a/* /root/keep/`,
# and at once (within the machine's idle release) a call carrying .devcarry/fa4b that sources bench/device/fa4_env.sh.
set -euo pipefail
rm -rf .devcarry/fa4a .devcarry/fa4b && mkdir -p .devcarry/fa4a .devcarry/fa4b/whl
download() {
  python3 -m pip download -q --no-deps --pre --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d "$1" "$2"
}
for spec in flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
            nvidia-cutlass-dsl-libs-core==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 \
            quack-kernels==0.6.5; do
  download .devcarry/fa4b/whl "$spec"
done
download .devcarry/fa4a nvidia-cutlass-dsl-libs-cu13==4.8.1
big=$(ls .devcarry/fa4a/*.whl)
sha256sum "$big" | sed "s#  .*/#  #" > .devcarry/fa4b/libs-cu13.sha256
head -c 46000000 "$big" > .devcarry/fa4a/libs-cu13.part1
tail -c +46000001 "$big" > .devcarry/fa4b/libs-cu13.part2
basename "$big" > .devcarry/fa4b/libs-cu13.name
rm "$big"
du -sh .devcarry/fa4a .devcarry/fa4b
