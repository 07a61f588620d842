#!/bin/bash
# Issue 4 (session 15), no model carry, about 3 min: the flex backend's one compiled graph per layer (now the default)
# against the backend up to session 14 (flex-unfused) where the step is bound by the device: 8192 tokens, LM and KL
# (cached), two interleaved rounds.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
cd bench
timeout 280 python3 search_speed.py --lengths 8192 --losses lm kl --backends flex-unfused+cached,flex+cached \
  --steps-only --repeats 8 --rounds 2 --json $OUT/search-speed-fused-8192-h200.json 2>&1 | grep -v Warn | tail -2
