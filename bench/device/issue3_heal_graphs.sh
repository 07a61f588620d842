#!/bin/bash
# `consa heal --cuda-graphs` (session 22) against the eager healing on the real model, one after the other on the
# GPU alone: the same allocation (the 0.5 vote), the same 200 steps and rows; prints each run's step time and the
# largest relative difference of their per-step KL. (bench/device/heal_step_probe.py measured the step on a random
# model of this shape: 232 ms eager, 63 ms graphed, float32, H200.) The CUDA tests of tests/test_heal.py run first.
# Run after a call carrying .devcarry/a that copies gguf.part1 to /root/keep (see env.sh), carry .devcarry/b.
source bench/device/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
[ -n "$SKIP_TESTS" ] || timeout 100 python3 -m pytest tests/test_heal.py -q -p no:cacheprovider -o addopts="" -k "graph" 2>&1 | tail -3
G=/root/keep/SMOLLM2.gguf
V50=$REPO/.devcarry/b/masks/vote4-kl-lm-rf0.5-300steps-seeds10-13-s0.5.safetensors
mkdir -p /tmp/graphs && cd /tmp/graphs
for mode in no-cuda-graphs cuda-graphs; do
  timeout 200 $CONSA heal $V50 --model $G --steps 200 --$mode --output heal-$mode --force 2>&1 \
    | tr '\r' '\n' | grep -v "it/s\|Warn\|Loading" | grep -i "model\|KL\|error" | tail -3
  cp heal-$mode/heal_log.json $OUT/heal-$mode-log.json 2>/dev/null
done
python3 - <<'PY'
import json
logs = {m: json.load(open(f"heal-{m}/heal_log.json")) for m in ("no-cuda-graphs", "cuda-graphs")}
for m, log in logs.items():
    s = [e["seconds"] for e in log["steps"]]
    print(m, "graphs" if log["cuda_graphs"] else "eager", f"{(s[-1] - s[19]) / (len(s) - 20) * 1000:.1f} ms/step",
          f"(steps 20-{len(s) - 1}), whole healing {log['seconds']} s")
kl = [[e["kl"] for e in log["steps"]] for log in logs.values()]
print("max relative KL difference:", max(abs(a - b) / abs(a) for a, b in zip(*kl)))
PY
