#!/bin/bash
# Issue 4 (session 13), no model carry: the fused loss kernels' tests (CUDA, and the interpreter on this machine's
# Triton) and their speed after the vocabulary became a compile-time constant; graph_step.py with each layer's row of
# the relaxed weights taken inside the captured forward (the first capture failed on rows taken outside it).
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest tests/test_loss_kernels.py tests/test_teacher.py -p no:cacheprovider -o addopts="" -q 2>&1 | tail -2
cd bench
timeout 90 python3 loss_kernel_speed.py --tokens 4096 8192 --json $OUT/loss-kernels-h200.json 2>&1 | grep "^{"
timeout 280 python3 graph_step.py --lengths 4096 8192 --rounds 2 --repeats 6 \
  --json $OUT/graph-step-h200.json 2>&1 | grep -v Warn | tail -3
