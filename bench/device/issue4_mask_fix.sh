#!/bin/bash
# Issue 4 (session 17), no model carry, about 7 min. issue4_graph_8192_profile.sh found why the search step captured
# as CUDA graphs was 2.4x slower at 8192 tokens: transformers 5.17 builds the causal mask while a graph is captured
# (and while dynamo traces), and the mask sent consa's relaxed mix to the two-call reference path (two cuDNN calls per
# layer with a T x T mask, no flex kernel). consa's mask function now drops that mask. Measured again: (1) the graphed
# step against the eager one at 4096 and 8192 tokens, (2) --compile (dynamo: the same mask) against eager flex at 8192.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
cd bench
timeout 220 python3 graph_step.py --lengths 4096 8192 --rounds 2 --repeats 6 \
  --json $OUT/graph-step-maskfix-h200.json 2>&1 | grep "^{" | python3 -c "
import ast, sys
for line in sys.stdin:
    row = ast.literal_eval(line)
    print({k: v for k, v in row.items() if k.endswith(('_ms', '_vs_dense', 'difference', 'failed')) or k == 'tokens'})"
timeout 330 python3 search_speed.py --lengths 8192 --losses lm kl --backends flex+cached,flex+compile+cached \
  --steps-only --repeats 8 --rounds 2 --json $OUT/search-speed-compile-maskfix-8192-h200.json 2>&1 | grep -v Warn | tail -3
