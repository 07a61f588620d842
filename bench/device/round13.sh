#!/bin/bash
# Round 13 (docs/results.md 1g.8) as it ran on one H200, 2026-12-03: three calibration arms x 4 seeds x 300 steps at
# 2048 tokens (held-out formats only), six searches side by side, the vote of each arm's four seeds, then consa eval
# of votes + seeds (noise haystack) and of the votes on the prose haystack. Carry .devcarry/b (see prepare_carry.sh);
# results in $OUT. In the session it ran as two calls (searches, then votes + evaluation: ~3 + ~3.5 minutes).
source bench/device/env.sh
S="--model /root/keep/SMOLLM2.gguf --device cuda --granularity kv-head --window 128 --sink-tokens 4 --seq-len 2048
   --steps 300 --loss kl --retrieval-fraction 0.5 --retrieval-loss lm --attention-backend sdpa --sparsity 0.75 --seeds 2"
mkdir -p /tmp/r13 && cd /tmp/r13
for half in a:0 b:2; do
  h=${half%%:*}; s=${half##*:}
  $CONSA search $S --seed $s --retrieval-filter answered --output answ-$h > answ-$h.log 2>&1 &
  $CONSA search $S --seed $s --calibration-haystack filler --retrieval-formats locker-number --output lock-$h > lock-$h.log 2>&1 &
  $CONSA search $S --seed $s --calibration-haystack filler --retrieval-formats room-code,home-city,locker-number \
      --output fill3-$h > fill3-$h.log 2>&1 &
done
wait
for arm in answ lock fill3; do
  python3 $REPO/bench/vote_allocations.py $arm-a/seed-*/allocation.safetensors $arm-b/seed-*/allocation.safetensors \
      --output vote4-$arm.safetensors
done
E="--device cuda --max-sequences 100 --seq-len 1024 --retrieval passkey,multikey --retrieval-lengths 1024,2048
   --retrieval-depths 0.1,0.5,0.9 --retrieval-samples 8"
$CONSA eval vote4-*.safetensors answ-?/seed-* $E --retrieval-haystack noise --json $OUT/round13-eval.json > eval1.log 2>&1 &
$CONSA eval lock-?/seed-* fill3-?/seed-* $E --no-dense --retrieval-haystack noise --json $OUT/round13-eval-seeds.json > eval2.log 2>&1 &
$CONSA eval vote4-*.safetensors $E --retrieval-haystack prose --json $OUT/round13-prose-eval.json > eval3.log 2>&1 &
wait
tar czf $OUT/round13.tgz *.log vote4-*.safetensors */allocation.safetensors */seed-*/allocation.safetensors
