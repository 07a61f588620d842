#!/bin/bash
# Issue 4 (session 12): the KL teacher cache and CUDA graphs, no model carry (a Qwen3-0.6B shape, random weights).
# 1. flex vs flex+cached (every step revisits one sequence: the teacher's hidden state comes from the search's cache,
#    the steady state of a search longer than its calibration set) for KL and LM (LM has no teacher: a drift
#    control), two interleaved rounds at 4096 and 8192 tokens; the recipe's projected time with the cache
#    (first visits of its 126 sequences computed, the other 174 steps cached).
# 2. flex vs flex+compile vs flex+graphs (--compile as torch.compile mode="reduce-overhead": the forwards and their
#    backward replayed as CUDA graphs) at 4096 tokens, LM: is the host-bound 4096 step's launch overhead the gap?
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
cd bench
timeout 330 python3 search_speed.py --lengths 4096 8192 --losses kl lm --backends flex,flex+cached --steps-only \
  --repeats 8 --rounds 2 --json $OUT/search-speed-teacher-cache-h200.json 2>&1 | grep -v Warn | tail -4
timeout 240 python3 search_speed.py --lengths 4096 --losses lm --backends flex,flex+compile,flex+graphs --steps-only \
  --repeats 8 --json $OUT/search-speed-graphs-4096-h200.json 2>&1 | grep -v Warn | tail -6
