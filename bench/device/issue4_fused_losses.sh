#!/bin/bash
# Issue 4 (session 13), no model carry, two calls:
#   bash bench/device/issue4_fused_losses.sh 1   (<= 9 min) the fused Triton loss kernels (consa_cli.loss_kernels):
#       their CUDA tests; the losses alone, fused vs compiled chunks (bench/loss_kernel_speed.py); the search step
#       with the fused losses vs +chunks, LM and KL, the KL teacher computed and cached, 2 rounds at 8192 and 4096.
#   bash bench/device/issue4_fused_losses.sh 2   (<= 6 min) bench/graph_step.py (written in session 12): the gated
#       forward and backward captured as CUDA graphs at 4096 and 8192 tokens.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "${1:-1}" = 1 ]; then
  timeout 150 python3 -m pytest tests/test_loss_kernels.py tests/test_search.py -p no:cacheprovider -o addopts="" -q \
    -k "fused or cuda or chunked or masked or mixed" 2>&1 | tail -3
  cd bench
  timeout 90 python3 loss_kernel_speed.py --tokens 4096 8192 --json $OUT/loss-kernels-h200.json 2>&1 | grep "^{"
  timeout 330 python3 search_speed.py --lengths 8192 4096 --losses lm kl \
    --backends flex,flex+chunks,flex+cached,flex+cached+chunks --steps-only --repeats 8 --rounds 2 \
    --json $OUT/search-speed-fused-losses-h200.json 2>&1 | grep -v Warn | tail -4
else
  cd bench
  timeout 330 python3 graph_step.py --lengths 4096 8192 --rounds 2 --json $OUT/graph-step-h200.json 2>&1 \
    | grep -v Warn | tail -6
fi
