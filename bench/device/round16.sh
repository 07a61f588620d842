#!/bin/bash
# Round 16 (issue 3, session 11): a copy task as the retrieval calibration. Round 15's facts the dense model answers
# (new4, div7) did worse than the default formats (votes 38% / 42% of dense retrieval, results.md 1g.10). The new
# `word-list` format is not a question: its prompt repeats the needle's words up to the first listed word and the
# answer is the rest of the list, i.e. the long-range copying that the evaluation's passkey and multikey prompts
# also lean on (they repeat their needle's words), without any of their words. Two arms, 1g.5's design otherwise
# (1024 tokens, batch 1, 150 steps, text haystack, four seeds, held-out evaluation): `copy` (word-list alone) and
# `copy3` (room-code, home-city, word-list). Carry .devcarry/b after a call that left .devcarry/a's part 1 in
# /root/keep; results in $OUT; resumable as round15.sh (searches stop at ${LIMIT:-420} s; run again to finish).
source bench/device/env.sh
S="--model /root/keep/SMOLLM2.gguf --device cuda --granularity kv-head --window 128 --sink-tokens 4 --seq-len 1024
   --loss kl --retrieval-fraction 0.5 --retrieval-loss lm --attention-backend sdpa --sparsity 0.75 --seeds 2 --steps 150"
mkdir -p /tmp/r16 && cd /tmp/r16
for half in a:0 b:2; do
  h=${half%%:*}; s=${half##*:}
  timeout ${LIMIT:-420} $CONSA search $S --retrieval-formats word-list --seed $s --output copy-$h > copy-$h.log 2>&1 &
  timeout ${LIMIT:-420} $CONSA search $S --retrieval-formats room-code,home-city,word-list --seed $s \
      --output copy3-$h > copy3-$h.log 2>&1 &
done
wait
for f in *.log; do echo "== $f"; tr '\r' '\n' < $f | grep -E "vote of|Error|error" | tail -2; done
ls */allocation.safetensors | wc -l | grep -qx 4 || { echo "searches unfinished: run again"; exit 0; }
vote4 copy copy3
E=$EVAL_ARGS
$CONSA eval vote4-*.safetensors copy-?/seed-* $E --retrieval-haystack noise --json $OUT/round16-eval.json > eval1.log 2>&1 &
$CONSA eval copy3-?/seed-* $E --no-dense --retrieval-haystack noise --json $OUT/round16-eval-seeds.json > eval2.log 2>&1 &
$CONSA eval vote4-*.safetensors $E --retrieval-haystack prose --json $OUT/round16-prose-eval.json > eval3.log 2>&1 &
wait
grep -h "overall\|gained" eval1.log eval2.log eval3.log
tar czf $OUT/round16.tgz *.log vote4-*.safetensors */allocation.safetensors */seed-*/allocation.safetensors
