#!/bin/bash
# Issue 3 (session 17): more weight on the retrieval samples, the one calibration lever not yet tried at 0.5, where
# the goal is retrieval alone (match dense). Held-out formats only (the search's defaults: room-code, home-city in
# calibration text), KL on text + LM on the answers, 4 seeds x 300 steps at 1024 tokens and their vote, as the 0.5
# vote of results.md 1g.6 (rf0.5: 94% of dense on 288 prompts, below dense, sign test p 0.007-0.013):
#   rf75-s050: --retrieval-fraction 0.75 at sparsity 0.5 (seeds 10-13, as 1g.6's)
#   rf90-s050: --retrieval-fraction 0.9  at sparsity 0.5 (seeds 10-13)
#   rf75-s075: --retrieval-fraction 0.75 at sparsity 0.75 (seeds 0-3, as 1g.5's 77% vote; one rf0.75 seed gave 70%)
# Set before the run: the 0.5 goal counts as met when a vote is within 2 points of dense on the 288 prompts and not
# below it by the paired sign test (p > 0.05); 0.75 when a vote keeps >= 80% of dense and stays ahead of the
# interleaved rule on perplexity (+0.0487 vs dense on these sequences). Evaluation as 1g.15 (100 held-out sequences,
# 288 prompts: passkey + multikey at 1024 / 2048, depths 0.1 / 0.5 / 0.9, 24 per cell, noise haystack).
# Carry .devcarry/b after a call that left /root/keep/gguf.part1 (bench/device/prepare_carry.sh).
source bench/device/env.sh
nvidia-smi --query-gpu=name --format=csv,noheader
S="--model /root/keep/SMOLLM2.gguf --device cuda --granularity kv-head --window 128 --sink-tokens 4 --seq-len 1024
   --steps 300 --loss kl --retrieval-loss lm --attention-backend sdpa --seeds 2"
mkdir -p /tmp/rw && cd /tmp/rw
for half in a:0 b:2; do
  h=${half%%:*}; s=${half##*:}
  $CONSA search $S --sparsity 0.5 --retrieval-fraction 0.75 --seed $((s + 10)) --output rf75-s050-$h > rf75-s050-$h.log 2>&1 &
  $CONSA search $S --sparsity 0.5 --retrieval-fraction 0.9 --seed $((s + 10)) --output rf90-s050-$h > rf90-s050-$h.log 2>&1 &
  $CONSA search $S --sparsity 0.75 --retrieval-fraction 0.75 --seed $s --output rf75-s075-$h > rf75-s075-$h.log 2>&1 &
done
wait
grep -h "vote of\|rror" *.log
vote4 rf75-s050 rf90-s050 rf75-s075
ls vote4-*.safetensors
E="--device cuda --max-sequences 100 --seq-len 1024 --batch-size 8 --retrieval passkey,multikey
   --retrieval-lengths 1024,2048 --retrieval-depths 0.1,0.5,0.9 --retrieval-samples 24 --retrieval-haystack noise"
$CONSA eval vote4-rf75-s050.safetensors $E --json $OUT/rw-rf75-s050-eval.json > eval-rf75-s050.log 2>&1 &
$CONSA eval vote4-rf90-s050.safetensors $E --no-dense --json $OUT/rw-rf90-s050-eval.json > eval-rf90-s050.log 2>&1 &
$CONSA eval vote4-rf75-s075.safetensors $E --no-dense --json $OUT/rw-rf75-s075-eval.json > eval-rf75-s075.log 2>&1 &
wait
for f in eval-*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -v "Warn\|Loading\|it/s" | grep -i "overall\|error\|vs dense" | tail -6; done
tar czf $OUT/retrieval-weight.tgz *.log vote4-*.safetensors */seed-*/allocation.safetensors
