#!/bin/bash
# Issue 4 (prepared in session 10, ran in session 11: docs/benchmarks.md "Session 11"), no model carry, two calls:
#   bash bench/device/issue4_profile_chunks.sh 1   (<= 9 min) the CUDA tests of the closed-gate path; LM and KL
#       steps of flex with --skip-closed-gates, the gates started mostly closed (log_alpha -3: about 80% of samples
#       clamp at 0, as late in a 0.75 search) next to flex started the same way; then flex (chunks of 1024, the
#       default since session 10) vs flex without chunks at the default start; 16 timed steps each, 8192 then 4096.
#   bash bench/device/issue4_profile_chunks.sh 2   (<= 3.5 min) a kernel profile of one layer at 8192 tokens
#       (dense, flex, flex without chunks) and the window's floor without sinks.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "${1:-1}" = 1 ]; then
  timeout 60 python3 -m pytest tests/test_kernels.py -p no:cacheprovider -o addopts="" -q -k "closed" 2>&1 | tail -2
  cd bench
  timeout 220 python3 search_speed.py --lengths 8192 4096 --losses lm kl --backends flex,flex+skip --log-alpha-init -3 \
    --steps-only --repeats 16 --json $OUT/search-speed-skip-h200.json 2>&1 | grep -v Warn | tail -4
  timeout 250 python3 search_speed.py --lengths 8192 4096 --losses lm kl --backends flex --flex-query-chunks 0 \
    --steps-only --repeats 16 --json $OUT/search-speed-chunks-h200.json 2>&1 | grep -v Warn | tail -4
else
  cd bench
  timeout 120 python3 profile_search_kernels.py --tokens 8192 --backends dense,flex,flex-qc0 --rows 24 \
    > $OUT/profile_search_kernels_8192_chunks_h200.txt 2>&1; tail -3 $OUT/profile_search_kernels_8192_chunks_h200.txt
  timeout 90 python3 search_speed.py --lengths 4096 8192 --kernels-only --kernel-backends flex --flex-query-chunks 0 \
    --sink-tokens 0 --json $OUT/flex-nosinks-kernels-h200.json 2>&1 | grep -v Warn | tail -2
fi
