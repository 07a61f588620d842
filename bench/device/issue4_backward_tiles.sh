#!/bin/bash
# Issue 4 (prepared in session 9; not yet run): does a smaller key tile in FlexAttention's backward shorten the
# straggler thread block that walks every query block for the key block holding the sinks (docs/benchmarks.md,
# sessions 8 and 9)? Session 4's sweep tried forward tiles only. Kernel rows at 4096 and 8192 tokens, window 512 +
# 4 sinks, each candidate a separately compiled window mix; --sink-tokens 0 once for the floor. <= 4 minutes.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
cd bench
timeout 200 python3 search_speed.py --lengths 4096 8192 --kernels-only --json $OUT/flex-backward-tiles-h200.json \
  --flex-configs '[{"kernel_options":{"BLOCK_M1":32,"BLOCK_N1":64,"BLOCK_M2":64,"BLOCK_N2":32}},
                   {"kernel_options":{"BLOCK_M1":64,"BLOCK_N1":64,"BLOCK_M2":64,"BLOCK_N2":64}},
                   {"kernel_options":{"BLOCK_M1":32,"BLOCK_N1":32,"BLOCK_M2":32,"BLOCK_N2":32}},
                   {"kernel_options":{"BLOCK_M1":16,"BLOCK_N1":64,"BLOCK_M2":64,"BLOCK_N2":16}}]' 2>&1 | grep -v Warn | tail -6
timeout 60 python3 search_speed.py --lengths 4096 8192 --kernels-only --sink-tokens 0 \
  --json $OUT/flex-nosinks-kernels-h200.json 2>&1 | grep -v Warn | tail -3
