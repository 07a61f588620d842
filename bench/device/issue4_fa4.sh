#!/bin/bash
# Issue 4 (session 15, NOT yet run): the fa4 backend (SDPA full + flash-attn-4's window, sinks merged through its
# differentiable log-sum-exp) on the GPU. Needs flash-attn-4 carried in two calls (bash bench/device/prepare_fa4_carry.sh
# here; a call carrying .devcarry/fa4a runs `mkdir -p /root/keep && cp .devcarry/fa4a/* /root/keep/`, then at once
# a call carrying .devcarry/fa4b runs this script). About 6 min: its CUDA tests, then the kernels and the steps against
# flex at 8192 and 4096 tokens, LM and KL (cached), two rounds.
source bench/device/fa4_env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest tests/test_kernels.py -q -p no:cacheprovider -o addopts="" -k "fa4" 2>&1 | tail -2
cd bench
timeout 380 python3 search_speed.py --lengths 8192 4096 --losses lm kl --backends flex+cached,fa4+cached \
  --kernel-backends flex,fa4 --repeats 8 --rounds 2 --json $OUT/search-speed-fa4-h200.json 2>&1 \
  | grep -v "Warn\|warn\|exe_args" | tail -6
