#!/bin/bash
# Issue 4 (session 17), no model carry, about 5 min: the default flex backend against the dense step at 8192 tokens,
# LM and KL (teacher cache), six interleaved rounds in one call -- the paired per-round ratios whose median settles
# the 0.85x goal at this length (sessions 15 and 16 ran two rounds each and differed by 0.05: 0.859 vs 0.812, LM).
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
cd bench
timeout 540 python3 search_speed.py --lengths 8192 --losses lm kl --backends flex+cached \
  --steps-only --repeats 8 --rounds 6 --json $OUT/search-speed-rounds-8192-h200.json 2>&1 | grep -v Warn | tail -4
