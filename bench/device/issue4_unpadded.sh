#!/bin/bash
# Issue 4, session 18, no model carry, under 10 min. issue4_mask_diag.py showed why session 17's graphed step (0.90x
# dense at 8192) fell to 0.36x once the mask function honoured allow_is_causal_skip (f1db81e): while a graph is
# captured transformers cannot rule out packed sequences, passes allow_is_causal_skip=False and wants the T x T mask.
# The search now installs its hybrid under an attention name without a mask function (no mask at all). Measured:
# (1) the CUDA tests of graphed and compiled search against eager, (2) the rounds prepared in session 17 (eager flex
# vs --cuda-graphs, LM and cached KL, 4096 and 8192, three rounds), (3) first-visit KL with graphs next to the naive
# two-call sdpa column, (4) --compile at 8192 (it traced the same mask).
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest tests/test_search.py -q -p no:cacheprovider -k "cuda_cuda_graphs or cuda_compiled_search" 2>&1 | tail -2
cd bench
timeout 200 python3 search_speed.py --lengths 4096 8192 --losses lm kl --backends flex+cached,flex+cached+cudagraphs \
  --steps-only --warmup 2 --repeats 6 --rounds 3 --json $OUT/search-speed-unpadded-rounds-h200.json 2>&1 \
  | grep "^{" | cut -c1-900
timeout 130 python3 search_speed.py --lengths 4096 8192 --losses kl --backends flex+cudagraphs,sdpa \
  --steps-only --warmup 2 --repeats 5 --rounds 1 --json $OUT/search-speed-unpadded-first-h200.json 2>&1 \
  | grep "^{" | cut -c1-700
timeout 120 python3 search_speed.py --lengths 8192 --losses lm --backends flex+cached,flex+compile+cached \
  --steps-only --warmup 3 --repeats 5 --rounds 1 --json $OUT/search-speed-unpadded-compile-h200.json 2>&1 \
  | grep "^{" | cut -c1-700
