#!/bin/bash
# Issue 4, prepared in session 17 for the next GPU session (NOT yet run), no model carry. What issue4_cuda_graphs.sh
# measured in one round, in interleaved rounds, plus what it left out: (1) 4096 and 8192 tokens, LM and KL with the
# teacher cache, eager flex against --cuda-graphs, three rounds (~5 min); with argument "first" instead (2) the KL step
# on a first visit (every step a new sequence: the teacher's own forward, eager) and the naive two-call `sdpa` column
# next to the graphed step, one round (~4 min).
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
cd bench
if [ "$1" = first ]; then
  timeout 300 python3 search_speed.py --lengths 4096 8192 --losses kl lm --backends flex+cudagraphs,sdpa \
    --steps-only --warmup 2 --repeats 5 --rounds 1 --json $OUT/search-speed-cuda-graphs-first-h200.json 2>&1 \
    | grep "^{" | cut -c1-700
else
  timeout 480 python3 search_speed.py --lengths 4096 8192 --losses lm kl --backends flex+cached,flex+cached+cudagraphs \
    --steps-only --warmup 2 --repeats 6 --rounds 3 --json $OUT/search-speed-cuda-graphs-rounds-h200.json 2>&1 \
    | grep "^{" | cut -c1-900
fi
