#!/bin/bash
# Issue 4 (session 15), no model carry. The one-sequence 4096-token step waits on the host's launches: does one
# compiled graph per layer for the whole relaxed mix (full branch, weights, window; the flex default now) and that
# graph replayed as CUDA graphs (flex-graphs) cut it? flex-unfused is the backend up to session 14.
#   bash bench/device/issue4_fused_graphs.sh 1   # CUDA tests of the variants, then host time on the thin model
#   bash bench/device/issue4_fused_graphs.sh 2   # the Qwen3-0.6B shape, LM and KL (cached), two rounds
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "$1" = 1 ]; then
  timeout 200 python3 -m pytest tests/test_kernels.py -q -p no:cacheprovider -o addopts="" -k "flex" 2>&1 | tail -4
  cd bench
  timeout 330 python3 search_speed.py --thin --lengths 4096 --losses lm --backends flex-unfused,flex,flex-graphs,sdpa \
    --steps-only --repeats 8 --rounds 2 --json $OUT/search-speed-thin-4096-h200.json 2>&1 | grep -v Warn | tail -3
else
  cd bench
  timeout 560 python3 search_speed.py --lengths 4096 --losses lm kl \
    --backends flex-unfused+cached,flex+cached,flex-graphs+cached --steps-only --repeats 8 --rounds 2 \
    --json $OUT/search-speed-fused-graphs-4096-h200.json 2>&1 | grep -v Warn | tail -4
fi
