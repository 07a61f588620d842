#!/bin/bash
# Issue 4 (session 17), no model carry, about 3 min on what device time was left: `consa search --cuda-graphs` (the
# gated forward and backward captured once and replayed every step, consa_cli.search.GatedLogits) -- its CUDA tests
# (the graphed search against the eager one, flex and sdpa), then the step against the eager flex step and dense at
# 4096 and 8192 tokens, LM and KL (cached), one round.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 50 python3 -m pytest tests/test_search.py -q -p no:cacheprovider -o addopts="" -k "cuda_graphs" 2>&1 | tail -3
cd bench
timeout 135 python3 search_speed.py --lengths 4096 8192 --losses lm kl --backends flex+cached,flex+cached+cudagraphs \
  --steps-only --warmup 2 --repeats 5 --rounds 1 --json $OUT/search-speed-cuda-graphs-h200.json 2>&1 | grep "^{" \
  | cut -c1-700
