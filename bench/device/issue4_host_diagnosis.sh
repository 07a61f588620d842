#!/bin/bash
# Issue 4 (session 13): why the 4096-token step is host-bound: the fused-loss interpreter check on this machine,
# a table of host operators per step (search_speed.py --device-busy --host-tables), and graph_step.py with the first
# synchronising op of the eager step (set_sync_debug_mode error) and the capture traceback.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
TRITON_INTERPRET=1 timeout 60 python3 -c "
import textwrap
exec(textwrap.dedent(open('tests/test_loss_kernels.py').read().split('INTERPRETED_CHECK = textwrap.dedent(\"\"\"')[1].split('\"\"\")')[0]))
" 2>&1 | grep -v "Warning\|output = op" | tail -8
cd bench
timeout 200 python3 search_speed.py --lengths 4096 --losses lm --backends flex --device-busy --repeats 4 \
  --host-tables $OUT/host-tables --json $OUT/search-host-4096-h200.json 2>&1 | grep "^{" | tail -2
timeout 200 python3 graph_step.py --lengths 4096 --rounds 1 --repeats 3 --json $OUT/graph-step-h200.json 2>&1 | grep -v Warn | tail -3
