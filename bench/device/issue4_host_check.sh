#!/bin/bash
# Issue 4 (session 17), no model carry, about 5 min. issue4_rounds_8192.sh found the flex step at 0.775x dense (LM)
# and 0.742x (KL, cached) by the median of six rounds at 8192 tokens, against 0.86x / 0.84x in session 15 on the same
# code. Is this machine's host slower? (1) The thin model (every width tiny: a step's time is the host's time to
# launch it) at 4096 tokens, as in session 15 (dense 84 ms, flex 118 ms, flex-graphs 97 ms per step); (2) 8192
# tokens, LM and KL, flex against flex-graphs (its per-layer graphs replayed as CUDA graphs: less host time), four rounds.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
lscpu | grep "Model name"
cd bench
timeout 150 python3 search_speed.py --thin --lengths 4096 --losses lm --backends flex,flex-graphs \
  --steps-only --repeats 8 --rounds 2 --json $OUT/search-speed-thin-4096-h200-s17.json 2>&1 | grep -v Warn | tail -2
timeout 400 python3 search_speed.py --lengths 8192 --losses lm kl --backends flex+cached,flex-graphs+cached \
  --steps-only --repeats 8 --rounds 4 --json $OUT/search-speed-graphs-rounds-8192-h200.json 2>&1 | grep -v Warn | tail -3
