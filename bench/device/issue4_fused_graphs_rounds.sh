#!/bin/bash
# Issue 4 (session 15), no model carry, about 6 min: the three flex variants (flex-unfused: the backend up to
# session 14; flex: one compiled graph per layer; flex-graphs: that graph as CUDA graphs) in four interleaved rounds,
# on the thin model (wall time ~ host time) and on the Qwen3-0.6B shape, LM loss, one 4096-token sequence per step.
# torch.compile's perf hints (e.g. why CUDA graphs were skipped) go to $OUT/perf-hints.log.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest tests/test_kernels.py -q -p no:cacheprovider -o addopts="" -k "flex" 2>&1 | tail -1
cd bench
for shape in thin full; do
  flag=$([ $shape = thin ] && echo --thin)
  TORCH_LOGS=perf_hints timeout 200 python3 search_speed.py $flag --lengths 4096 --losses lm \
    --backends flex-unfused,flex,flex-graphs --steps-only --repeats 6 --rounds 4 \
    --json $OUT/search-speed-variants-rounds-$shape-4096-h200.json 2>>$OUT/perf-hints.log | tail -1
done
