#!/bin/bash
# Issue 4 (session 13), no model carry: is the 4096-token gap the per-step host overhead? Two sequences per step
# (the search's --batch-size 2, the dense step likewise), LM and KL (cached), the gates started at log_alpha -3 (as
# late in a search) with and without --skip-closed-gates, two rounds. NOT yet run to the end: its first run (session 13) stopped in
# the bench's recipe projection (a +cached row without its uncached partner; fixed, CPU test in test_search.py).
# First, the losses alone at 8192 tokens: their extra peak memory since backward scales the gradient in place.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
cd bench
# the losses' extra peak memory with backward scaling the gradient in place (expect one logits-sized buffer)
timeout 90 python3 loss_kernel_speed.py --tokens 8192 --json $OUT/loss-kernels-inplace-h200.json 2>&1 | grep "^{"
timeout 270 python3 search_speed.py --lengths 4096 --batch-size 2 --losses lm kl --backends flex+cached,flex+cached+skip \
  --log-alpha-init -3 --steps-only --repeats 8 --rounds 2 --json $OUT/search-speed-batch2-4096-h200.json 2>&1 \
  | grep -v Warn | tail -4
