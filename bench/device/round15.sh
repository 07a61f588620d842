#!/bin/bash
# Round 15 (issue 3, prepared in session 10, ran in session 11: results.md 1g.10): calibration facts the dense model actually retrieves.
# The dense SmolLM2-135M answers 50% of the four new formats' samples in calibration text at 1024 tokens (flight-gate,
# pet-name, meeting-day, phone-extension; docs/results/calibration-answers-new4-text-cpu.json), against 10% of the
# default formats' (calibration-answers-default-text-48-cpu.json) -- and the held-out vote answers them clearly worse than dense (NLL +0.41 +- 0.13), where on
# the default formats masks scored better than dense: a signal that rewards keeping what the dense model retrieves.
# Two arms, 1g.5's design otherwise (1024 tokens, batch 1, 150 steps, text haystack, four seeds, held-out formats
# only): `new4` (the four new formats) and `div7` (all seven). (One CPU seed of `new4`: 33% of dense and no better
# than the interleaved rule on PPL, results.md 1g.9 -- one draw of a wide spread.) Carry .devcarry/b after a call that left
# .devcarry/a's part 1 in /root/keep; results in $OUT; resumable as round14.sh (searches stop at ${LIMIT:-420} s;
# run again to finish).
source bench/device/env.sh
S="--model /root/keep/SMOLLM2.gguf --device cuda --granularity kv-head --window 128 --sink-tokens 4 --seq-len 1024
   --loss kl --retrieval-fraction 0.5 --retrieval-loss lm --attention-backend sdpa --sparsity 0.75 --seeds 2 --steps 150"
NEW4=flight-gate,pet-name,meeting-day,phone-extension
mkdir -p /tmp/r15 && cd /tmp/r15
for half in a:0 b:2; do
  h=${half%%:*}; s=${half##*:}
  timeout ${LIMIT:-420} $CONSA search $S --retrieval-formats $NEW4 --seed $s --output new4-$h > new4-$h.log 2>&1 &
  timeout ${LIMIT:-420} $CONSA search $S --retrieval-formats room-code,home-city,locker-number,$NEW4 --seed $s \
      --output div7-$h > div7-$h.log 2>&1 &
done
wait
for f in *.log; do echo "== $f"; tr '\r' '\n' < $f | grep -E "vote of|Error|error" | tail -2; done
ls */allocation.safetensors | wc -l | grep -qx 4 || { echo "searches unfinished: run again"; exit 0; }
vote4 new4 div7
E=$EVAL_ARGS
$CONSA eval vote4-*.safetensors new4-?/seed-* $E --retrieval-haystack noise --json $OUT/round15-eval.json > eval1.log 2>&1 &
$CONSA eval div7-?/seed-* $E --no-dense --retrieval-haystack noise --json $OUT/round15-eval-seeds.json > eval2.log 2>&1 &
$CONSA eval vote4-*.safetensors $E --retrieval-haystack prose --json $OUT/round15-prose-eval.json > eval3.log 2>&1 &
wait
grep -h "overall\|gained" eval1.log eval2.log eval3.log
tar czf $OUT/round15.tgz *.log vote4-*.safetensors */allocation.safetensors */seed-*/allocation.safetensors
