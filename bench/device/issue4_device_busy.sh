#!/bin/bash
# Issue 4 (session 12): is the 4096-token step bound by the host? The device's kernel time per step against the
# step's wall time (torch.profiler), dense and flex (and the cached-teacher KL step), at 4096 and 8192 tokens.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
cd bench
timeout 240 python3 search_speed.py --lengths 4096 8192 --losses lm kl --backends flex,flex+cached --device-busy \
  --repeats 6 --json $OUT/search-device-busy-h200.json 2>&1 | grep "^{" | tail -4
