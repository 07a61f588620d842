#!/bin/bash
# Issue 4 (written in session 12, not yet run): the search step split at its relaxed weights with the gated forward
# and backward captured by torch.cuda.make_graphed_callables (bench/graph_step.py): does it capture, is it exact
# (graphed_loss_difference, graphed_grad_max_difference against the eager split step), and does the 4096-token step
# reach the 0.83x dense its kernels allow (search_speed.py --device-busy, session 12)? No model carry.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
cd bench
timeout 500 python3 graph_step.py --lengths 4096 8192 --rounds 2 --json $OUT/graph-step-h200.json 2>&1 \
  | grep -v Warn | tail -6
