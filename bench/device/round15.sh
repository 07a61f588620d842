#!/bin/bash
# Round 15 (issue 3, prepared in session 10; not yet run): do more varied calibration facts transfer better to the
# held-out evaluation? All seven calibration formats (the three tried plus flight-gate, pet-name, meeting-day,
# phone-extension) at 1024 tokens, batch 1, in the text haystack (1g.5's design, which once voted 77% with two
# formats and does not reproduce: 1g.9) and in the filler haystack (round 14's best seeds), 150 and 300 steps;
# four seeds each, held-out formats only (passkey / multikey never in calibration). Carry .devcarry/b after a call
# that left .devcarry/a's part 1 in /root/keep; results in $OUT; resumable as round14.sh (searches stop at
# ${LIMIT:-420} s; run again to finish).
source bench/device/env.sh
S="--model /root/keep/SMOLLM2.gguf --device cuda --granularity kv-head --window 128 --sink-tokens 4 --seq-len 1024
   --loss kl --retrieval-fraction 0.5 --retrieval-loss lm --attention-backend sdpa --sparsity 0.75 --seeds 2
   --retrieval-formats room-code,home-city,locker-number,flight-gate,pet-name,meeting-day,phone-extension"
mkdir -p /tmp/r15 && cd /tmp/r15
for half in a:0 b:2; do
  h=${half%%:*}; s=${half##*:}
  timeout ${LIMIT:-420} $CONSA search $S --steps 150 --seed $s --output div7-$h > div7-$h.log 2>&1 &
  timeout ${LIMIT:-420} $CONSA search $S --steps 300 --calibration-haystack filler --seed $s --output div7f-$h > div7f-$h.log 2>&1 &
done
wait
for f in *.log; do echo "== $f"; tr '\r' '\n' < $f | grep -E "vote of|Error|error" | tail -2; done
ls */allocation.safetensors | wc -l | grep -qx 4 || { echo "searches unfinished: run again"; exit 0; }
vote4 div7 div7f
E=$EVAL_ARGS
$CONSA eval vote4-*.safetensors div7-?/seed-* $E --retrieval-haystack noise --json $OUT/round15-eval.json > eval1.log 2>&1 &
$CONSA eval div7f-?/seed-* $E --no-dense --retrieval-haystack noise --json $OUT/round15-eval-seeds.json > eval2.log 2>&1 &
$CONSA eval vote4-*.safetensors $E --retrieval-haystack prose --json $OUT/round15-prose-eval.json > eval3.log 2>&1 &
wait
grep -h "overall\|gained" eval1.log eval2.log eval3.log
tar czf $OUT/round15.tgz *.log vote4-*.safetensors */allocation.safetensors */seed-*/allocation.safetensors
