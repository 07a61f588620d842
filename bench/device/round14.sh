#!/bin/bash
# Round 14 (issue 3, prepared in session 9; not yet run): the two levers that helped held-out retrieval so far --
# 1024-token calibration (1g.5: vote 77%, where 2048 gave 24-54%) and several sequences per step (round 11: 70% with
# two seeds) -- with the filler haystack whose single seeds did best in round 13 (fill3 seed 3: 76%). Three arms x 4
# seeds, held-out formats only: fill3 at 1024 (300 steps, batch 1), fill3 at 1024 with --batch-size 4 (150 steps), and
# the default text calibration at 1024 with --batch-size 4 (150 steps). Six searches side by side, the votes, then
# consa eval of votes + seeds (noise haystack) and of the votes on prose. Carry .devcarry/b (prepare_carry.sh) after a
# call that left .devcarry/a's part 1 in /root/keep; results in $OUT. Searches stop at ${LIMIT:-420} s and resume
# when the script runs again (finished seeds are kept), so a second call finishes the work.
source bench/device/env.sh
S="--model /root/keep/SMOLLM2.gguf --device cuda --granularity kv-head --window 128 --sink-tokens 4 --seq-len 1024
   --loss kl --retrieval-fraction 0.5 --retrieval-loss lm --attention-backend sdpa --sparsity 0.75 --seeds 2"
F="--calibration-haystack filler --retrieval-formats room-code,home-city,locker-number"
mkdir -p /tmp/r14 && cd /tmp/r14
for half in a:0 b:2; do
  h=${half%%:*}; s=${half##*:}
  timeout ${LIMIT:-420} $CONSA search $S $F --steps 300 --seed $s --output fill3-$h > fill3-$h.log 2>&1 &
  timeout ${LIMIT:-420} $CONSA search $S $F --steps 150 --batch-size 4 --seed $s --output fill3b4-$h > fill3b4-$h.log 2>&1 &
  timeout ${LIMIT:-420} $CONSA search $S --steps 150 --batch-size 4 --seed $s --output textb4-$h > textb4-$h.log 2>&1 &
done
wait
for f in *.log; do echo "== $f"; tr '\r' '\n' < $f | grep -E "vote of|Error|error" | tail -2; done
ls */allocation.safetensors | wc -l | grep -qx 6 || { echo "searches unfinished: run again"; exit 0; }
for arm in fill3 fill3b4 textb4; do
  python3 $REPO/bench/vote_allocations.py $arm-a/seed-*/allocation.safetensors $arm-b/seed-*/allocation.safetensors \
      --output vote4-$arm.safetensors
done
E="--device cuda --max-sequences 100 --seq-len 1024 --retrieval passkey,multikey --retrieval-lengths 1024,2048
   --retrieval-depths 0.1,0.5,0.9 --retrieval-samples 8"
$CONSA eval vote4-*.safetensors fill3-?/seed-* $E --retrieval-haystack noise --json $OUT/round14-eval.json > eval1.log 2>&1 &
$CONSA eval fill3b4-?/seed-* textb4-?/seed-* $E --no-dense --retrieval-haystack noise --json $OUT/round14-eval-seeds.json > eval2.log 2>&1 &
$CONSA eval vote4-*.safetensors $E --retrieval-haystack prose --json $OUT/round14-prose-eval.json > eval3.log 2>&1 &
wait
grep -h "overall" eval1.log eval2.log eval3.log
tar czf $OUT/round14.tgz *.log vote4-*.safetensors */allocation.safetensors */seed-*/allocation.safetensors
