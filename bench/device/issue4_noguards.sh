#!/bin/bash
# Issue 4 (session 14), no model carry, about 2.5 min: does skipping torch.compile's guard evaluation after the
# first step (torch.compiler.set_stance(skip_guard_eval_unsafe=True); bench option NAME+noguards) cut the host time
# that bounds the one-sequence 4096-token step? Session 13's host tables: 112 dynamo cache lookups of 69 us per step.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
cd bench
timeout 280 python3 search_speed.py --lengths 4096 --losses lm kl --backends flex+cached,flex+cached+noguards \
  --steps-only --repeats 8 --rounds 2 --json $OUT/search-speed-noguards-4096-h200.json 2>&1 | grep -v Warn | tail -4
