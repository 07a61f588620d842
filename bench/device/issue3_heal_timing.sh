#!/bin/bash
# Issue 3 (session 19): `consa heal` alone on the GPU (the controls' call ran ten healings side by side), its
# defaults (400 steps of one 1024-token sequence, float32) with each CUDA attention backend, one after the other.
source bench/device/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
V75=$REPO/.devcarry/b/masks/vote4-kl-lm-rf0.5-seeds0-3-s0.75.safetensors
mkdir -p /tmp/timing && cd /tmp/timing
for backend in flex sdpa; do
  start=$(date +%s.%N)
  timeout 250 $CONSA heal $V75 --attention-backend $backend --output heal-$backend > $backend.log 2>&1
  end=$(date +%s.%N)
  echo "$backend: exit $? wall $(python3 -c "print(round($end - $start, 1))") s"; tail -3 $backend.log
  python3 -c "import json; d=json.load(open('heal-$backend/heal_log.json')); s=d['steps']; print('steps', len(s), 'train s', d['seconds'], 'last-100 KL', round(sum(e['kl'] for e in s[-100:])/100, 4), 'step 100-399 s/step', round((s[-1]['seconds']-s[99]['seconds'])/300, 4))"
done
cp */heal_log.json . 2>/dev/null; tar czf $OUT/heal-timing.tgz *.log heal-*/heal_log.json
