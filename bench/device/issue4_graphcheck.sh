#!/bin/bash
# Issue 4 (session 15), no model carry, about 1 min: does flex-graphs hit CUDA graph trees' fast path after its
# first step? Every warning printed (-W always), counted; then the 4096-token LM row.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
cd bench
timeout 150 python3 -W always::UserWarning search_speed.py --lengths 4096 --losses lm --backends flex-graphs --steps-only --warmup 3 --repeats 12 --json $OUT/graphcheck.json > $OUT/graphcheck.log 2>&1
grep -c "pending, uninvoked" $OUT/graphcheck.log; grep -i "cudagraph\|skipping" $OUT/graphcheck.log | grep -v "pending, uninvoked" | sort | uniq -c | head; tail -1 $OUT/graphcheck.log
