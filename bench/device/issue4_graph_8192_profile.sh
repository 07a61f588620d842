#!/bin/bash
# Issue 4 (session 17), no model carry, about 3 min: why the search step captured as CUDA graphs (bench/graph_step.py)
# ran 2.4x slower than the eager step at 8192 tokens in session 13 while it was faster at 4096. One length, the
# kernels of two steps of each kind profiled (plain eager, eager split, graphed split), then two timed rounds.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
cd bench
timeout 400 python3 graph_step.py --lengths 8192 --rounds 2 --repeats 4 --profile 2 \
  --json $OUT/graph-step-profile-8192-h200.json 2>&1 | grep -v Warn | tail -2 | cut -c1-1500
python3 - <<'PY'
import json, os
row = json.load(open(os.environ["OUT"] + "/graph-step-profile-8192-h200.json"))["rows"][0]
for name, table in row.get("profiles", {}).items():
    print("==", name)
    for line in table.splitlines()[:22]:
        print(line[:60] + " | " + " ".join(line[60:].split()[-7:]))
PY
