#!/bin/bash
# Issue 4 (prepared in session 10; not yet run): where the chunked flex mix's remaining time goes, and the step
# rows with both losses. <= 9.5 minutes, no model carry. (1) a kernel profile of one layer at 8192 tokens: dense,
# flex (chunks of 1024, the default since session 10), flex without chunks; (2) the window's floor without sinks;
# (3) LM and KL steps of flex vs flex without chunks, 16 timed steps each, 8192 then 4096 tokens; (4) the same with
# --skip-closed-gates and the gates started mostly closed (log_alpha -3: about 80% of samples clamp at 0, as late
# in a 0.75 search), next to flex started the same way. Run the CUDA tests of the closed-gate path first.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 60 python3 -m pytest tests/test_kernels.py -p no:cacheprovider -o addopts="" -q -k "closed" 2>&1 | tail -2
cd bench
timeout 120 python3 profile_search_kernels.py --tokens 8192 --backends dense,flex,flex-qc0 --rows 24 \
  > $OUT/profile_search_kernels_8192_chunks_h200.txt 2>&1; tail -3 $OUT/profile_search_kernels_8192_chunks_h200.txt
timeout 90 python3 search_speed.py --lengths 4096 8192 --kernels-only --kernel-backends flex --flex-query-chunks 0 \
  --sink-tokens 0 --json $OUT/flex-nosinks-kernels-h200.json 2>&1 | grep -v Warn | tail -2
timeout 270 python3 search_speed.py --lengths 8192 4096 --losses lm kl --backends flex --flex-query-chunks 0 \
  --steps-only --repeats 16 --json $OUT/search-speed-h200-s11.json 2>&1 | grep -v Warn | tail -4
timeout 200 python3 search_speed.py --lengths 8192 4096 --losses lm kl --backends flex,flex+skip --log-alpha-init -3 \
  --steps-only --repeats 16 --json $OUT/search-speed-skip-h200-s11.json 2>&1 | grep -v Warn | tail -4
