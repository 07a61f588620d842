#!/bin/bash
# Issue 4 (session 10): the flex window over query chunks (kernels.to_window_chunks), which bounds how many query
# blocks the sinks' key block is walked by in FlexAttention's backward. One call, <= 9.5 minutes, no model carry:
# the CUDA tests of the chunked kernel, the attention-alone rows for chunks of 512 / 1024 / 2048 queries, and the
# LM-loss search step with the two smaller chunk sizes next to flex and the dense step, at 4096 and 8192 tokens.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 90 python3 -m pytest tests/test_kernels.py -p no:cacheprovider -o addopts="" -q -k "chunk" 2>&1 | tail -4
cd bench
timeout 170 python3 search_speed.py --lengths 4096 8192 --kernels-only --kernel-backends flex --flex-query-chunks 512 1024 2048 \
  --json $OUT/flex-query-chunks-kernels-h200.json 2>&1 | grep -v Warn | tail -3
timeout 250 python3 search_speed.py --lengths 4096 8192 --losses lm --backends flex --flex-query-chunks 512 1024 --steps-only \
  --json $OUT/flex-query-chunks-steps-h200.json 2>&1 | grep -v Warn | tail -8
