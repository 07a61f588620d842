#!/bin/bash
# Issue 4 (written in session 13, NOT yet run: the lease was spent), no model carry, about 4 min: does inductor's
# C++ wrapper for the compiled window + mix (backend flex-cpp) cut the host time that bounds the 4096-token step?
# Session 13's host tables put the compiled region's Python wrapper first among the search step's extra host work
# (~20 of 24 ms per step under the profiler). Two rounds, LM and KL (cached), 4096 then 8192; then the host tables.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
cd bench
timeout 300 python3 search_speed.py --lengths 4096 8192 --losses lm kl --backends flex+cached,flex-cpp+cached \
  --steps-only --repeats 8 --rounds 2 --json $OUT/search-speed-cpp-wrapper-h200.json 2>&1 | grep -v Warn | tail -5
timeout 150 python3 search_speed.py --lengths 4096 --losses lm --backends flex,flex-cpp --device-busy --repeats 4 \
  --host-tables $OUT/host-tables-cpp --json $OUT/search-host-cpp-4096-h200.json 2>&1 | grep -v Warn | tail -2
