#!/bin/bash
# Issue 4 (session 11): flex vs flex+skip (--skip-closed-gates), the gates started ~77% closed (log_alpha -3, as
# late in a 0.75 search), in three interleaved rounds (--rounds 3: every other round in reverse order, each round's
# ratio listed). Session 11's first run (one round, 16 steps each) had flex+skip ahead at 8192 tokens (LM 0.828 vs
# 0.787, KL 0.652 vs 0.586) and behind at 4096 (LM 0.688 vs 0.740, KL 0.523 vs 0.648), with the unchanged flex row
# 0.74 / 0.80 at 4096 in two runs of the same call: this run tells drift from effect. No model carry (<= 6 min).
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
cd bench
timeout 330 python3 search_speed.py --lengths 8192 4096 --losses lm kl --backends flex,flex+skip --log-alpha-init -3 \
  --steps-only --repeats 8 --rounds 3 --json $OUT/search-speed-skip-rounds-h200.json 2>&1 | grep -v Warn | tail -4
